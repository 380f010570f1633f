//! Decryption of result sets on their way to the client: RowDescription
//! fields that come from protected columns get their declared type, their
//! DataRow cells are opened, and a cell that cannot be opened turns the rest
//! of the result into one ErrorResponse (KM001/KM002/KM005/KM006).

use std::sync::Arc;

use bytes::BytesMut;

use std::sync::atomic::Ordering;

use super::encryption::{CellFailure, DecryptBatch, Encryption, SessionInfo};
use super::state::SessionState;
use crate::catalog::{CatalogMap, ColumnRole};
use crate::config::{DeclaredType, Policy};
use crate::protocol::messages::{
    decode_data_row, decode_row_description, encode_data_row, encode_row_description, Field,
    Malformed,
};
use crate::protocol::{backend, ErrorResponse, HEADER_LEN};
use crate::values;

/// A protected column of the current result set.
struct PlannedColumn {
    index: usize,
    table: Arc<str>,
    column: Arc<str>,
    ty: DeclaredType,
    binary: bool,
}

/// How to present the rows of the current result set.
pub struct ResultPlan {
    columns: Vec<PlannedColumn>,
    /// Field indexes removed from the result (EDEK, blind index).
    hidden: Vec<usize>,
    /// Unmapped bytea fields (index, binary, name): a cell there that is an
    /// envelope reached the result through a view, function or expression.
    watched: Vec<(usize, bool, String)>,
    /// Whether the last row failed: the rest of the result is dropped.
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

/// Plans a RowDescription. `None`: no protected column, forward unchanged.
pub fn plan_row_description(
    frame: &[u8],
    catalog: &CatalogMap,
    policy: &Policy,
    fingerprint: String,
) -> Result<Option<(ResultPlan, BytesMut)>, Malformed> {
    let fields = decode_row_description(&frame[HEADER_LEN..])?;
    let mut columns = Vec::new();
    let mut hidden = Vec::new();
    let mut watched = Vec::new();
    let mut out_fields: Vec<Field<'_>> = Vec::with_capacity(fields.len());
    for (index, field) in fields.iter().enumerate() {
        match catalog.lookup(field.table_oid, field.column) {
            Some(col) => match col.role {
                ColumnRole::Protected(ty) => {
                    columns.push(PlannedColumn {
                        index,
                        table: col.table.clone(),
                        column: col.column.clone(),
                        ty,
                        binary: field.format == 1,
                    });
                    out_fields.push(Field {
                        type_oid: ty.oid(),
                        type_size: type_size(ty),
                        type_modifier: -1,
                        ..field.clone()
                    });
                }
                ColumnRole::Edek | ColumnRole::BlindIndex
                    if !policy.tables.get(&*col.table).is_some_and(|t| t.show_edek) =>
                {
                    hidden.push(index);
                }
                _ => out_fields.push(field.clone()),
            },
            None => {
                if field.type_oid == BYTEA_OID {
                    watched.push((index, field.format == 1, field.name.to_owned()));
                }
                out_fields.push(field.clone())
            }
        }
    }
    if columns.is_empty() && hidden.is_empty() && watched.is_empty() {
        return Ok(None);
    }
    let mut out = BytesMut::with_capacity(frame.len());
    encode_row_description(&out_fields, &mut out);
    let column_names = columns.iter().map(|c| c.column.to_string()).collect();
    Ok(Some((
        ResultPlan {
            columns,
            hidden,
            watched,
            failed: false,
            batch: DecryptBatch {
                fingerprint,
                ..DecryptBatch::default()
            },
            column_names,
        },
        out,
    )))
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
        for (index, binary, name) in &self.watched {
            if let Some(Some(raw)) = cells.get(*index) {
                if looks_like_envelope(raw, *binary) {
                    return Err(self.fail(
                        "KM003",
                        &format!(
                            "cmk-proxy: result column \"{name}\" carries protected (encrypted) data through a view, function or expression, which is not supported: select the protected column from its table"
                        ),
                    ));
                }
            }
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
            let presented = if column.binary {
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

/// The result-side state of a session: the plan of the result set being
/// relayed, if it has protected columns.
#[derive(Default)]
pub struct ResultState {
    plan: Option<ResultPlan>,
    /// A result failed: at the next ReadyForQuery inside a transaction, the
    /// transaction is poisoned (SQLSTATE, message).
    failure: Option<(&'static str, String)>,
}

impl ResultState {
    /// True while a result set with protected columns is being relayed.
    pub fn active(&self) -> bool {
        self.plan.is_some()
    }

    /// True when the next ReadyForQuery must come through `server_message`.
    pub fn wants_ready(&self) -> bool {
        self.failure.is_some()
    }

    /// Handles a held server message; returns the bytes to send the client
    /// (empty to send nothing).
    pub async fn server_message(
        &mut self,
        frame: &[u8],
        encryption: &Encryption,
        state: &SessionState,
    ) -> BytesMut {
        if state.swallowing() {
            // The response to an injected statement: never shown.
            if frame.first() == Some(&backend::READY_FOR_QUERY) {
                state.swallow.fetch_sub(1, Ordering::AcqRel);
            }
            return BytesMut::new();
        }
        match frame.first().copied() {
            Some(backend::ROW_DESCRIPTION) => {
                self.plan = None;
                let catalog = encryption.catalog();
                match plan_row_description(frame, &catalog, encryption.policy(), String::new()) {
                    Ok(Some((plan, out))) => {
                        self.plan = Some(plan);
                        out
                    }
                    Ok(None) => BytesMut::from(frame),
                    Err(e) => {
                        ErrorResponse::error("08P01", &format!("cmk-proxy: {e} from the server"))
                            .to_bytes()
                    }
                }
            }
            Some(backend::DATA_ROW) => {
                let Some(plan) = self.plan.as_mut() else {
                    return BytesMut::from(frame);
                };
                if plan.failed {
                    return BytesMut::new();
                }
                let tenant = state.tenant();
                match plan.decrypt_row(frame, encryption, tenant.as_deref()).await {
                    Ok(out) => out,
                    Err((code, message, out)) => {
                        self.failure = Some((code, message));
                        out
                    }
                }
            }
            Some(backend::COMMAND_COMPLETE) => match self.plan.take() {
                Some(plan) if plan.failed => BytesMut::new(),
                Some(mut plan) => {
                    let info = SessionInfo {
                        tenant: None,
                        user: &state.user,
                        client_addr: &state.client_addr,
                    };
                    encryption.audit_decrypt(plan.take_batch(), &info);
                    BytesMut::from(frame)
                }
                None => BytesMut::from(frame),
            },
            Some(backend::ERROR_RESPONSE) => {
                self.plan = None;
                let answered = state.answered.load(Ordering::Acquire);
                let swap = state.error_swaps.lock().ok().and_then(|mut swaps| {
                    while swaps.front().is_some_and(|(cycle, _, _)| *cycle < answered) {
                        swaps.pop_front();
                    }
                    if swaps
                        .front()
                        .is_some_and(|(cycle, _, _)| *cycle == answered)
                    {
                        swaps.pop_front()
                    } else {
                        None
                    }
                });
                match swap {
                    Some((_, code, message)) => ErrorResponse::error(code, &message).to_bytes(),
                    None => BytesMut::from(frame),
                }
            }
            Some(backend::READY_FOR_QUERY) => {
                self.plan = None;
                if state.refresh_catalog.swap(false, Ordering::AcqRel) {
                    encryption.refresh_catalog().await;
                }
                let mut out = BytesMut::from(frame);
                if let Some((code, message)) = self.failure.take() {
                    if out.last() == Some(&b'T') {
                        // The client was told its statement failed: from its
                        // point of view the transaction is aborted, and the
                        // server's will be before anything else runs.
                        if let Ok(mut poison) = state.poison.lock() {
                            *poison = Some((code, message));
                        }
                        if let Some(status) = out.last_mut() {
                            *status = b'E';
                        }
                    }
                }
                out
            }
            _ => BytesMut::from(frame),
        }
    }
}
