//! Decryption of result sets on their way to the client: RowDescription
//! fields that come from protected columns get their declared type, their
//! DataRow cells are opened, and a cell that cannot be opened turns the rest
//! of the result into one ErrorResponse (KM001/KM002/KM005/KM006).

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use super::encryption::{CellFailure, DecryptBatch, Encryption};
use crate::catalog::{CatalogMap, ColumnRole};
use crate::config::{DeclaredType, Policy};
use crate::protocol::messages::{
    decode_data_row, decode_row_description, encode_data_row, encode_row_description, format_of,
    Field, Malformed,
};
use crate::protocol::{ErrorResponse, HEADER_LEN};
use crate::{rewrite, values};

/// A protected column of the current result set.
#[derive(Debug)]
struct PlannedColumn {
    index: usize,
    table: Arc<str>,
    column: Arc<str>,
    ty: DeclaredType,
    /// The server sends the cell in binary.
    binary: bool,
    /// The client wants the plaintext in binary.
    client_binary: bool,
    /// Where its row's tenant is.
    row_tenant: RowTenant,
}

/// Where the tenant of a protected cell's row comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowTenant {
    /// Nowhere (a result the proxy did not add tenant columns to, such as
    /// RETURNING): the cell's own tenant and the session's are checked.
    Unchecked,
    /// The hidden field of this index in `ResultLayout::row_tenants`.
    Field(usize),
    /// The proxy added tenant columns, but none (or several) of this
    /// column's table: its cells are refused.
    Unknown,
}

/// A result field the proxy added that names a row's tenant.
#[derive(Debug)]
struct RowTenantField {
    index: usize,
    table: Arc<str>,
    binary: bool,
    type_oid: u32,
}

/// `frame` (a RowDescription) with the column origins (table OID, column
/// number) that `described`, the description of its statement, names for
/// fields that name none: Citus rebuilds the target list of a router
/// query's plan without them, while PostgreSQL describes the statement
/// from the analysed query. A field is taken over only when its name and
/// type agree. `None`: nothing to take over.
pub fn with_statement_origins(frame: &[u8], described: &[u8]) -> Option<Bytes> {
    let fields = decode_row_description(frame.get(HEADER_LEN..)?).ok()?;
    if fields.iter().all(|f| f.table_oid != 0) {
        return None;
    }
    let origins = decode_row_description(described.get(HEADER_LEN..)?).ok()?;
    if origins.len() != fields.len() {
        return None;
    }
    let mut changed = false;
    let merged: Vec<Field<'_>> = fields
        .iter()
        .zip(&origins)
        .map(|(field, origin)| {
            let take = field.table_oid == 0
                && origin.table_oid != 0
                && field.name == origin.name
                && field.type_oid == origin.type_oid;
            changed |= take;
            Field {
                table_oid: if take {
                    origin.table_oid
                } else {
                    field.table_oid
                },
                column: if take { origin.column } else { field.column },
                ..field.clone()
            }
        })
        .collect();
    if !changed {
        return None;
    }
    let mut out = BytesMut::with_capacity(frame.len());
    encode_row_description(&merged, &mut out);
    Some(out.freeze())
}

/// What the rows of a result set need: planned once per RowDescription
/// (and formats), shared by every execution with the same one.
#[derive(Debug)]
pub struct ResultLayout {
    columns: Vec<PlannedColumn>,
    /// Field indexes removed from the result (EDEK, blind index, row tenants).
    hidden: Vec<usize>,
    /// The row-tenant fields the proxy added.
    row_tenants: Vec<RowTenantField>,
    /// Unmapped bytea fields (index, binary, name): a cell there that is an
    /// envelope reached the result through a view, function or expression.
    watched: Vec<(usize, bool, String)>,
    /// The columns are unknown: every cell is watched, in both formats.
    watch_all: bool,
    /// Names of the decrypted columns, for the audit.
    column_names: Arc<[String]>,
}

/// A RowDescription planned: the layout of its rows (`None`: nothing to
/// decrypt, hide or watch) and the frame the client is shown (`None`: the
/// server's, unchanged).
#[derive(Debug)]
pub struct PlannedRows {
    /// What the rows need.
    pub layout: Option<Arc<ResultLayout>>,
    /// The RowDescription the client sees.
    pub shown: Option<Bytes>,
}

impl PlannedRows {
    /// No rows, or none that need the proxy.
    pub fn nothing() -> Self {
        Self {
            layout: None,
            shown: None,
        }
    }
}

/// How to present the rows of the current result set.
pub struct ResultPlan {
    layout: Arc<ResultLayout>,
    /// Whether a row failed: the rest of the result is dropped.
    pub failed: bool,
    batch: DecryptBatch,
}

/// The last RowDescription planned for a statement, with the formats it was
/// planned for: drivers execute the same statement with the same formats
/// over and over, and each Describe or Execute would otherwise plan it anew.
/// Shared by every session that prepares the same SQL; the frame (table
/// OIDs, column numbers, types) is compared whole, so a different answer
/// (another search_path) is planned again, never confused.
#[derive(Default)]
pub struct RowPlanMemo(Mutex<Option<MemoEntry>>);

struct MemoEntry {
    catalog: Arc<CatalogMap>,
    frame: Bytes,
    wire: Option<Vec<i16>>,
    client: Option<Vec<i16>>,
    planned: Arc<PlannedRows>,
}

impl std::fmt::Debug for RowPlanMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RowPlanMemo")
    }
}

impl RowPlanMemo {
    /// The plan of `frame` with the given formats (see [`plan_rows`]),
    /// from the memo when the same frame, formats and catalog were planned last.
    pub fn plan(
        &self,
        frame: &[u8],
        wire: Option<&[i16]>,
        client: Option<&[i16]>,
        catalog: &Arc<CatalogMap>,
        policy: &Policy,
    ) -> Result<Arc<PlannedRows>, Malformed> {
        if let Ok(memo) = self.0.lock() {
            if let Some(entry) = memo.as_ref() {
                if Arc::ptr_eq(&entry.catalog, catalog)
                    && entry.frame[..] == *frame
                    && entry.wire.as_deref() == wire
                    && entry.client.as_deref() == client
                {
                    return Ok(entry.planned.clone());
                }
            }
        }
        let planned = Arc::new(plan_rows(frame, wire, client, catalog, policy)?);
        if let Ok(mut memo) = self.0.lock() {
            *memo = Some(MemoEntry {
                catalog: catalog.clone(),
                frame: Bytes::copy_from_slice(frame),
                wire: wire.map(<[i16]>::to_vec),
                client: client.map(<[i16]>::to_vec),
                planned: planned.clone(),
            });
        }
        Ok(planned)
    }
}

/// OID of bytea, the storage type of protected columns.
const BYTEA_OID: u32 = 17;

/// An envelope header, in binary or in bytea's hex text form.
fn looks_like_envelope(raw: &[u8], binary: bool) -> bool {
    if binary {
        crate::crypto::is_envelope(raw)
    } else {
        // hex output, or escape output (`SET bytea_output = escape`)
        raw.starts_with(b"\\x434d4b01") || raw.starts_with(b"CMK\\001")
    }
}

/// Size a client expects for a fixed-size declared type (-1 = variable).
fn type_size(ty: DeclaredType) -> i16 {
    use DeclaredType as T;
    match ty {
        T::Int2 => 2,
        T::Int4 | T::Date => 4,
        T::Int8 | T::Float8 | T::Timestamp | T::Timestamptz => 8,
        T::Bool => 1,
        T::Uuid => 16,
        _ => -1,
    }
}

/// Plans a RowDescription frame. `wire`: the result formats the server
/// was asked for, when the frame does not carry them (the answer to a
/// Describe of a statement has text formats); `client`: the formats the
/// client asked for, when the proxy asked the server for others (binary
/// protected cells). `None`: the frame's own formats.
pub fn plan_rows(
    frame: &[u8],
    wire: Option<&[i16]>,
    client: Option<&[i16]>,
    catalog: &CatalogMap,
    policy: &Policy,
) -> Result<PlannedRows, Malformed> {
    let mut fields = decode_row_description(&frame[HEADER_LEN..])?;
    if let Some(wire) = wire {
        for (i, field) in fields.iter_mut().enumerate() {
            field.format = format_of(wire, i);
        }
    }
    Ok(match plan_fields(&fields, catalog, policy, client) {
        Some((layout, shown)) => {
            let mut out = BytesMut::with_capacity(frame.len());
            encode_row_description(&shown, &mut out);
            PlannedRows {
                layout: Some(Arc::new(layout)),
                shown: Some(out.freeze()),
            }
        }
        None => PlannedRows::nothing(),
    })
}

/// The number of result columns of a RowDescription, and the indexes of
/// those that come from protected columns.
pub fn protected_result_columns(
    row_description: &[u8],
    catalog: &CatalogMap,
) -> Result<(usize, Vec<usize>), Malformed> {
    let fields = decode_row_description(&row_description[HEADER_LEN..])?;
    let protected = fields
        .iter()
        .enumerate()
        .filter(|(_, f)| {
            matches!(
                catalog.lookup(f.table_oid, f.column).map(|c| &c.role),
                Some(ColumnRole::Protected(_))
            )
        })
        .map(|(i, _)| i)
        .collect();
    Ok((fields.len(), protected))
}

/// Plans result fields: which to decrypt, hide or watch, and the fields as
/// the client sees them. `None`: no protected column, nothing to watch.
fn plan_fields<'f>(
    fields: &[Field<'f>],
    catalog: &CatalogMap,
    policy: &Policy,
    client_formats: Option<&[i16]>,
) -> Option<(ResultLayout, Vec<Field<'f>>)> {
    let mut columns = Vec::new();
    let mut hidden = Vec::new();
    let mut watched = Vec::new();
    let mut shown: Vec<Field<'f>> = Vec::with_capacity(fields.len());
    let row_tenants = row_tenant_fields(fields, catalog);
    for (index, field) in fields.iter().enumerate() {
        if row_tenants.iter().any(|t| t.index == index) {
            hidden.push(index);
            continue;
        }
        match catalog.lookup(field.table_oid, field.column) {
            Some(col) => match col.role {
                ColumnRole::Protected(ty) => {
                    let client_format =
                        client_formats.map_or(field.format, |f| format_of(f, index));
                    columns.push(PlannedColumn {
                        index,
                        table: col.table.clone(),
                        column: col.column.clone(),
                        ty,
                        binary: field.format == 1,
                        client_binary: client_format == 1,
                        row_tenant: row_tenant_of(&row_tenants, &col.table),
                    });
                    shown.push(Field {
                        type_oid: ty.oid(),
                        type_size: type_size(ty),
                        type_modifier: -1,
                        format: client_format,
                        ..field.clone()
                    });
                }
                ColumnRole::Edek | ColumnRole::BlindIndex
                    if !policy.tables.get(&*col.table).is_some_and(|t| t.show_edek) =>
                {
                    hidden.push(index);
                }
                _ => shown.push(field.clone()),
            },
            None => {
                if field.type_oid == BYTEA_OID {
                    watched.push((index, field.format == 1, field.name.to_owned()));
                }
                shown.push(field.clone())
            }
        }
    }
    if columns.is_empty() && hidden.is_empty() && watched.is_empty() {
        return None;
    }
    let column_names = columns.iter().map(|c| c.column.to_string()).collect();
    Some((
        ResultLayout {
            columns,
            hidden,
            row_tenants,
            watched,
            watch_all: false,
            column_names,
        },
        shown,
    ))
}

impl ResultPlan {
    /// The rows of one result set with `layout`.
    pub fn new(layout: Arc<ResultLayout>, fingerprint: &Arc<str>) -> Self {
        Self {
            layout,
            failed: false,
            batch: DecryptBatch::new(fingerprint.clone()),
        }
    }

    /// Rows whose columns are unknown (no Describe was answered): nothing
    /// can be decrypted, and any cell that is an envelope is refused.
    pub fn unknown_shape(fingerprint: &Arc<str>) -> Self {
        let layout = ResultLayout {
            columns: Vec::new(),
            hidden: Vec::new(),
            row_tenants: Vec::new(),
            watched: Vec::new(),
            watch_all: true,
            column_names: Arc::from(Vec::new()),
        };
        Self::new(Arc::new(layout), fingerprint)
    }
}

/// The row-tenant fields the proxy added to a result: named
/// [`rewrite::ROW_TENANT_COLUMN`] and, by the catalog, a tenant column.
fn row_tenant_fields(fields: &[Field<'_>], catalog: &CatalogMap) -> Vec<RowTenantField> {
    fields
        .iter()
        .enumerate()
        .filter(|(_, field)| field.name == rewrite::ROW_TENANT_COLUMN)
        .filter_map(|(index, field)| {
            let column = catalog.lookup(field.table_oid, field.column)?;
            matches!(column.role, ColumnRole::Tenant).then(|| RowTenantField {
                index,
                table: column.table.clone(),
                binary: field.format == 1,
                type_oid: field.type_oid,
            })
        })
        .collect()
}

/// Where the rows of `table` name their tenant among `fields`.
fn row_tenant_of(fields: &[RowTenantField], table: &Arc<str>) -> RowTenant {
    if fields.is_empty() {
        return RowTenant::Unchecked;
    }
    let mut of_table = fields.iter().enumerate().filter(|(_, f)| f.table == *table);
    match (of_table.next(), of_table.next()) {
        (Some((i, _)), None) => RowTenant::Field(i),
        _ => RowTenant::Unknown,
    }
}

/// A row's tenant as text, from its text or binary form.
fn tenant_text(raw: &[u8], binary: bool, type_oid: u32) -> Option<String> {
    const BPCHAR: u32 = 1042;
    let text = |raw: &[u8]| {
        let text = std::str::from_utf8(raw).ok()?;
        // char(n) pads with spaces; the tenant is the value without them.
        Some(match type_oid {
            BPCHAR => text.trim_end_matches(' ').to_owned(),
            _ => text.to_owned(),
        })
    };
    if !binary {
        return text(raw);
    }
    match type_oid {
        // text, varchar, name, bpchar: their binary form is their text.
        25 | 1043 | 19 | BPCHAR => text(raw),
        21 => Some(i16::from_be_bytes(raw.try_into().ok()?).to_string()),
        23 => Some(i32::from_be_bytes(raw.try_into().ok()?).to_string()),
        20 => Some(i64::from_be_bytes(raw.try_into().ok()?).to_string()),
        2950 => Some(uuid::Uuid::from_slice(raw).ok()?.hyphenated().to_string()),
        _ => None,
    }
}

fn no_row_tenant(column: &PlannedColumn) -> String {
    format!(
        "cmk-proxy: integrity failure: a cell of {}.{} is in a row whose tenant cmk-proxy cannot read",
        column.table, column.column
    )
}

impl ResultPlan {
    /// Opens the protected cells of one DataRow. `Ok(frame)` to forward, or
    /// the ErrorResponse to send instead (the plan is then `failed`).
    pub async fn decrypt_row(
        &mut self,
        frame: &[u8],
        encryption: &Encryption,
        session_tenant: Option<&str>,
    ) -> Result<BytesMut, (&'static str, String, BytesMut)> {
        let cells = match decode_data_row(&frame[HEADER_LEN..]) {
            Ok(cells) => cells,
            Err(e) => return Err(self.fail("08P01", &format!("cmk-proxy: {e} from the server"))),
        };
        let layout = &*self.layout;
        let leaked = layout
            .watched
            .iter()
            .find(|(index, binary, _)| {
                matches!(cells.get(*index), Some(Some(raw)) if looks_like_envelope(raw, *binary))
            })
            .map(|(_, _, name)| format!("result column \"{name}\""))
            .or_else(|| {
                let any = cells.iter().flatten().any(|raw| {
                    looks_like_envelope(raw, true) || looks_like_envelope(raw, false)
                });
                (layout.watch_all && any).then(|| "a result column".to_owned())
            });
        if let Some(what) = leaked {
            return Err(self.fail(
                "KM003",
                &format!(
                    "cmk-proxy: {what} carries protected (encrypted) data through a view, function or expression, which is not supported: select the protected column from its table"
                ),
            ));
        }
        let mut opened: Vec<(usize, Vec<u8>)> = Vec::with_capacity(layout.columns.len());
        let mut row_tenant: Option<(Arc<str>, &Arc<str>)> = None;
        for column in &layout.columns {
            let Some(Some(raw)) = cells.get(column.index) else {
                continue;
            };
            let envelope: std::borrow::Cow<'_, [u8]> = if column.binary {
                std::borrow::Cow::Borrowed(raw)
            } else {
                match std::str::from_utf8(raw).ok().and_then(values::parse_bytea) {
                    Some(bytes) => std::borrow::Cow::Owned(bytes),
                    None => {
                        let message = format!(
                            "cmk-proxy: integrity failure: a cell of {}.{} is not bytea",
                            column.table, column.column
                        );
                        return Err(self.fail("KM005", &message));
                    }
                }
            };
            let owner = match column.row_tenant {
                RowTenant::Unchecked => None,
                RowTenant::Field(i) => {
                    let named = layout.row_tenants.get(i).and_then(|field| {
                        let raw = cells.get(field.index).copied().flatten()?;
                        tenant_text(raw, field.binary, field.type_oid)
                    });
                    match named {
                        Some(tenant) => Some(tenant),
                        None => return Err(self.fail("KM005", &no_row_tenant(column))),
                    }
                }
                RowTenant::Unknown => return Err(self.fail("KM005", &no_row_tenant(column))),
            };
            let (tenant, plaintext) = match encryption
                .open_cell(
                    &column.table,
                    &column.column,
                    &envelope,
                    session_tenant,
                    owner.as_deref(),
                )
                .await
            {
                Ok(done) => done,
                Err(failure) => return Err(self.fail_cell(&failure)),
            };
            let presented = if column.client_binary {
                let text = String::from_utf8_lossy(&plaintext);
                match values::to_binary(column.ty, &text) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        let message = format!("cmk-proxy: {}.{}: {e}", column.table, column.column);
                        return Err(self.fail("KM005", &message));
                    }
                }
            } else {
                plaintext
            };
            opened.push((column.index, presented));
            if let Some(tenant) = tenant {
                row_tenant = Some((tenant, &column.table));
            }
        }
        if let Some((tenant, table)) = row_tenant {
            self.batch.add(&tenant, table, &layout.column_names);
        }
        let values = cells
            .iter()
            .enumerate()
            .filter(|(i, _)| !layout.hidden.contains(i))
            .map(
                |(i, cell)| match opened.iter().find(|(index, _)| *index == i) {
                    Some((_, bytes)) => Some(bytes.as_slice()),
                    None => *cell,
                },
            );
        let size = frame.len() + opened.iter().map(|(_, v)| v.len()).sum::<usize>();
        let mut out = BytesMut::with_capacity(size);
        encode_data_row(values, &mut out);
        Ok(out)
    }

    fn fail_cell(&mut self, failure: &CellFailure) -> (&'static str, String, BytesMut) {
        self.fail(failure.sqlstate, &failure.message)
    }

    fn fail(&mut self, code: &'static str, message: &str) -> (&'static str, String, BytesMut) {
        self.failed = true;
        (
            code,
            message.to_owned(),
            ErrorResponse::error(code, message).to_bytes(),
        )
    }

    /// The audit counts of this result.
    pub fn take_batch(&mut self) -> DecryptBatch {
        std::mem::take(&mut self.batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rows_tenant_reads_the_same_in_text_and_binary() {
        assert_eq!(tenant_text(b"acme", false, 25).as_deref(), Some("acme"));
        assert_eq!(tenant_text(b"acme", true, 1043).as_deref(), Some("acme"));
        assert_eq!(tenant_text(b"acme  ", true, 1042).as_deref(), Some("acme"));
        assert_eq!(tenant_text(b"acme  ", false, 1042).as_deref(), Some("acme"));
        assert_eq!(
            tenant_text(&42i32.to_be_bytes(), true, 23).as_deref(),
            Some("42")
        );
        assert_eq!(tenant_text(b"42", false, 23).as_deref(), Some("42"));
        assert_eq!(
            tenant_text(&(-7i64).to_be_bytes(), true, 20).as_deref(),
            Some("-7")
        );
        let id = uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(
            tenant_text(id.as_bytes(), true, 2950).as_deref(),
            Some("01234567-89ab-cdef-0123-456789abcdef")
        );
        // A binary form it cannot read, or a wrong length: no tenant.
        assert_eq!(tenant_text(b"\x00\x01", true, 23), None);
        assert_eq!(tenant_text(b"x", true, 1700), None);
        assert_eq!(tenant_text(b"\xff", false, 25), None);
    }

    #[test]
    fn each_protected_column_pairs_with_its_own_tables_row_tenant() {
        let field = |index, table: &str| RowTenantField {
            index,
            table: Arc::from(table),
            binary: false,
            type_oid: 25,
        };
        let patients: Arc<str> = Arc::from("public.patients");
        assert_eq!(row_tenant_of(&[], &patients), RowTenant::Unchecked);
        let fields = [field(3, "public.visits"), field(4, "public.patients")];
        assert_eq!(row_tenant_of(&fields, &patients), RowTenant::Field(1));
        let only_visits = [field(3, "public.visits")];
        assert_eq!(row_tenant_of(&only_visits, &patients), RowTenant::Unknown);
        let twice = [field(3, "public.patients"), field(4, "public.patients")];
        assert_eq!(row_tenant_of(&twice, &patients), RowTenant::Unknown);
    }
}
