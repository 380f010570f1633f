//! What the columns of a relation carry: the origin of each protected
//! value, by position where the relation's target list is known, by name
//! where only the policy or the catalog says which columns are protected.

/// Where a protected value comes from: a policy table's (or a protected
/// view's) column, and the relation of the query at hand that delivers it.
#[derive(Debug, Clone)]
pub(super) struct Origin {
    pub(super) table: String,
    pub(super) column: String,
    /// The id of the relation it was last read from.
    pub(super) via: usize,
}

impl PartialEq for Origin {
    fn eq(&self, other: &Self) -> bool {
        self.table == other.table && self.column == other.column
    }
}

impl Eq for Origin {}

/// The columns a relation (a table, view, CTE, subquery or join) shows to
/// the query that reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Columns {
    /// Every column in order, with the origin of those that carry a
    /// protected value (subqueries and CTEs whose target lists are known).
    Ordered(Vec<(String, Option<Origin>)>),
    /// Only the protected columns are known, by name; their positions and
    /// the other columns' names are not (tables, views, `SELECT *` of them).
    Named(Vec<(String, Origin)>),
}

/// What a column name means in one relation.
pub(super) enum Lookup {
    /// A column that carries a protected value.
    Protected(Origin),
    /// A column that carries none.
    Clean,
    /// No column of that name.
    Absent,
    /// Perhaps a column of that name that carries none, perhaps none.
    Unknown,
}

impl Columns {
    pub(super) fn clean() -> Self {
        Columns::Named(Vec::new())
    }

    pub(super) fn lookup(&self, name: &str) -> Lookup {
        match self {
            Columns::Ordered(columns) => {
                let mut found = Lookup::Absent;
                for (_, origin) in columns.iter().filter(|(c, _)| c == name) {
                    match origin {
                        Some(origin) => return Lookup::Protected(origin.clone()),
                        None => found = Lookup::Clean,
                    }
                }
                found
            }
            Columns::Named(columns) => match columns.iter().find(|(c, _)| c == name) {
                Some((_, origin)) => Lookup::Protected(origin.clone()),
                None => Lookup::Unknown,
            },
        }
    }

    pub(super) fn protected(&self) -> Vec<&Origin> {
        match self {
            Columns::Ordered(columns) => columns.iter().filter_map(|(_, o)| o.as_ref()).collect(),
            Columns::Named(columns) => columns.iter().map(|(_, o)| o).collect(),
        }
    }

    /// The origin carried at 1-based `position`; for columns of unknown
    /// positions, any protected one (the position may be it).
    pub(super) fn at(&self, position: usize) -> Option<Origin> {
        match self {
            Columns::Ordered(columns) => position
                .checked_sub(1)
                .and_then(|i| columns.get(i))
                .and_then(|(_, o)| o.clone()),
            Columns::Named(columns) => columns.first().map(|(_, o)| o.clone()),
        }
    }

    /// The columns renamed by an alias list (`AS p(a, b)`, `c(a, b) AS`):
    /// positional, so refused where positions of protected columns are
    /// not known.
    pub(super) fn renamed(self, names: &[String]) -> Result<Self, Origin> {
        if names.is_empty() {
            return Ok(self);
        }
        match self {
            Columns::Ordered(mut columns) => {
                for (column, name) in columns.iter_mut().zip(names) {
                    column.0 = name.clone();
                }
                Ok(Columns::Ordered(columns))
            }
            Columns::Named(columns) => match columns.into_iter().next() {
                Some((_, origin)) => Err(origin),
                None => Ok(Columns::clean()),
            },
        }
    }

    /// The columns of several relations side by side (a join, `*`).
    pub(super) fn concat(parts: Vec<Columns>) -> Self {
        if parts.iter().all(|p| matches!(p, Columns::Ordered(_))) {
            return Columns::Ordered(
                parts
                    .into_iter()
                    .flat_map(|p| match p {
                        Columns::Ordered(columns) => columns,
                        Columns::Named(_) => Vec::new(),
                    })
                    .collect(),
            );
        }
        Columns::Named(
            parts
                .into_iter()
                .flat_map(|p| match p {
                    Columns::Ordered(columns) => columns
                        .into_iter()
                        .filter_map(|(c, o)| Some((c, o?)))
                        .collect::<Vec<_>>(),
                    Columns::Named(columns) => columns,
                })
                .collect(),
        )
    }
}

/// A relation of a FROM list, under the name that qualifies its columns.
#[derive(Debug, Clone)]
pub(super) struct Relation {
    pub(super) id: usize,
    pub(super) name: String,
    pub(super) columns: Columns,
    /// Its column that names each row's tenant, when the proxy can attach
    /// it to the result (a policy table, a view that shows it).
    pub(super) row_tenant: Option<String>,
}

impl Relation {
    /// `lookup`, with the origin marked as read from this relation.
    pub(super) fn lookup(&self, name: &str) -> Lookup {
        match self.columns.lookup(name) {
            Lookup::Protected(origin) => Lookup::Protected(Origin {
                via: self.id,
                ..origin
            }),
            other => other,
        }
    }

    /// Its protected columns, marked as read from this relation.
    pub(super) fn columns_via(&self) -> Columns {
        let via = |origin: &Origin| Origin {
            via: self.id,
            ..origin.clone()
        };
        match &self.columns {
            Columns::Ordered(columns) => Columns::Ordered(
                columns
                    .iter()
                    .map(|(c, o)| (c.clone(), o.as_ref().map(via)))
                    .collect(),
            ),
            Columns::Named(columns) => {
                Columns::Named(columns.iter().map(|(c, o)| (c.clone(), via(o))).collect())
            }
        }
    }
}

/// The columns with their positions forgotten (`merged`: some were merged).
pub(super) fn forget_positions(columns: Columns, merged: bool) -> Columns {
    match columns {
        Columns::Ordered(columns) if merged => Columns::Named(
            columns
                .into_iter()
                .filter_map(|(c, o)| Some((c, o?)))
                .collect(),
        ),
        other => other,
    }
}

impl Origin {
    pub(super) fn of(table: &str, column: &str) -> Self {
        Self {
            table: table.to_owned(),
            column: column.to_owned(),
            via: 0,
        }
    }
}
