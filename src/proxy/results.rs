//! Decryption of result sets on their way to the client: RowDescription
//! fields that come from protected columns get their declared type, their
//! DataRow cells are opened, and a cell that cannot be opened turns the rest
//! of the result into one ErrorResponse (KM001/KM002/KM005/KM006).

use std::sync::Arc;

use bytes::BytesMut;

use super::encryption::{CellFailure, DecryptBatch, Encryption};
use crate::catalog::{CatalogMap, ColumnRole};
use crate::config::{DeclaredType, Policy};
use crate::protocol::messages::{
    decode_data_row, decode_row_description, encode_data_row, encode_row_description, format_of,
    Field, Malformed,
};
use crate::protocol::{ErrorResponse, HEADER_LEN};
use crate::values;

/// A protected column of the current result set.
struct PlannedColumn {
    index: usize,
    table: Arc<str>,
    column: Arc<str>,
    ty: DeclaredType,
    /// The server sends the cell in binary.
    binary: bool,
    /// The client wants the plaintext in binary.
    client_binary: bool,
}

/// How to present the rows of the current result set.
pub struct ResultPlan {
    columns: Vec<PlannedColumn>,
    /// Field indexes removed from the result (EDEK, blind index).
    hidden: Vec<usize>,
    /// Unmapped bytea fields (index, binary, name): a cell there that is an
    /// envelope reached the result through a view, function or expression.
    watched: Vec<(usize, bool, String)>,
    /// The columns are unknown: every cell is watched, in both formats.
    watch_all: bool,
    /// Whether a row failed: the rest of the result is dropped.
    pub failed: bool,
    batch: DecryptBatch,
    column_names: Vec<String>,
}

/// OID of bytea, the storage type of protected columns.
const BYTEA_OID: u32 = 17;

/// An envelope header, in binary or in bytea's hex text form.
fn looks_like_envelope(raw: &[u8], binary: bool) -> bool {
    if binary {
        crate::crypto::is_envelope(raw)
    } else {
        raw.starts_with(b"\\x434d4b01")
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

/// Plans a RowDescription frame: the plan and the frame the client sees.
/// `None`: no protected column, forward unchanged. `client_formats`: the
/// result formats the client asked for, when the proxy asked the server for
/// others (binary protected cells); `None`: the frame's own formats.
pub fn plan_row_description(
    frame: &[u8],
    catalog: &CatalogMap,
    policy: &Policy,
    fingerprint: &Arc<str>,
    client_formats: Option<&[i16]>,
) -> Result<Option<(ResultPlan, BytesMut)>, Malformed> {
    let fields = decode_row_description(&frame[HEADER_LEN..])?;
    Ok(
        plan_fields(&fields, catalog, policy, fingerprint, client_formats).map(|(plan, shown)| {
            let mut out = BytesMut::with_capacity(frame.len());
            encode_row_description(&shown, &mut out);
            (plan, out)
        }),
    )
}

/// Plans the rows of an execution from the RowDescription of its statement
/// (which the server sends with text formats) and the result formats of its
/// Bind. `None`: nothing to decrypt or watch.
pub fn plan_execution(
    row_description: &[u8],
    result_formats: &[i16],
    client_formats: &[i16],
    catalog: &CatalogMap,
    policy: &Policy,
    fingerprint: &Arc<str>,
) -> Result<Option<ResultPlan>, Malformed> {
    let mut fields = decode_row_description(&row_description[HEADER_LEN..])?;
    for (i, field) in fields.iter_mut().enumerate() {
        field.format = format_of(result_formats, i);
    }
    Ok(
        plan_fields(&fields, catalog, policy, fingerprint, Some(client_formats))
            .map(|(plan, _)| plan),
    )
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
    fingerprint: &Arc<str>,
    client_formats: Option<&[i16]>,
) -> Option<(ResultPlan, Vec<Field<'f>>)> {
    let mut columns = Vec::new();
    let mut hidden = Vec::new();
    let mut watched = Vec::new();
    let mut shown: Vec<Field<'f>> = Vec::with_capacity(fields.len());
    for (index, field) in fields.iter().enumerate() {
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
        ResultPlan {
            columns,
            hidden,
            watched,
            watch_all: false,
            failed: false,
            batch: DecryptBatch {
                fingerprint: fingerprint.to_string(),
                ..DecryptBatch::default()
            },
            column_names,
        },
        shown,
    ))
}

impl ResultPlan {
    /// Rows whose columns are unknown (no Describe was answered): nothing
    /// can be decrypted, and any cell that is an envelope is refused.
    pub fn unknown_shape(fingerprint: &Arc<str>) -> Self {
        Self {
            columns: Vec::new(),
            hidden: Vec::new(),
            watched: Vec::new(),
            watch_all: true,
            failed: false,
            batch: DecryptBatch {
                fingerprint: fingerprint.to_string(),
                ..DecryptBatch::default()
            },
            column_names: Vec::new(),
        }
    }
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
        let leaked = self
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
                (self.watch_all && any).then(|| "a result column".to_owned())
            });
        if let Some(what) = leaked {
            return Err(self.fail(
                "KM003",
                &format!(
                    "cmk-proxy: {what} carries protected (encrypted) data through a view, function or expression, which is not supported: select the protected column from its table"
                ),
            ));
        }
        let mut opened: Vec<Option<Vec<u8>>> = vec![None; cells.len()];
        let mut row_tenant: Option<(String, Arc<str>)> = None;
        for column in &self.columns {
            let Some(Some(raw)) = cells.get(column.index) else {
                continue;
            };
            let envelope = if column.binary {
                raw.to_vec()
            } else {
                match std::str::from_utf8(raw).ok().and_then(values::parse_bytea) {
                    Some(bytes) => bytes,
                    None => {
                        return Err(self.fail(
                            "KM005",
                            &format!(
                                "cmk-proxy: integrity failure: a cell of {}.{} is not bytea",
                                column.table, column.column
                            ),
                        ))
                    }
                }
            };
            let (tenant, plaintext) = match encryption
                .open_cell(&column.table, &column.column, &envelope, session_tenant)
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
                        return Err(self.fail(
                            "KM005",
                            &format!("cmk-proxy: {}.{}: {e}", column.table, column.column),
                        ))
                    }
                }
            } else {
                plaintext
            };
            opened[column.index] = Some(presented);
            if !tenant.is_empty() {
                row_tenant = Some((tenant, column.table.clone()));
            }
        }
        if let Some((tenant, table)) = row_tenant {
            self.batch.add(&tenant, &table, &self.column_names);
        }
        let values = cells
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.hidden.contains(i))
            .map(|(i, cell)| match &opened[i] {
                Some(bytes) => Some(bytes.as_slice()),
                None => *cell,
            });
        let values: Vec<Option<&[u8]>> = values.collect();
        let mut out = BytesMut::with_capacity(frame.len());
        encode_data_row(values.into_iter(), &mut out);
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
