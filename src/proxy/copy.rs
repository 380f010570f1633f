//! COPY on protected tables, in a session (docs/COPY.md). The client
//! direction turns the client's COPY data into the rows PostgreSQL stores
//! (cells sealed per row, EDEK and blind index added) and fails the whole
//! COPY on a bad row; the server direction rewrites the Copy responses and
//! turns the decrypted rows of a COPY TO into the client's format.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;

use super::encryption::{key_rejection, seal_value, Encryption};
use crate::crypto::BlindIndexKey;
use crate::protocol::encode;
use crate::protocol::messages::{decode_data_row, decode_row_description};
use crate::protocol::{backend, ErrorResponse, HEADER_LEN};
use crate::rewrite::{CopyFieldRole, CopyInPlan, Rejection, KM004};
use crate::values::copy::{
    write_client_row, write_upstream_bytea, write_upstream_field, CopyError, CopyOptions, RowReader,
};

/// A COPY the proxy takes part in, as planned for a simple query.
#[derive(Debug, Clone)]
pub enum CopyRewrite {
    /// COPY FROM STDIN into a policy table.
    In(Arc<CopyInPlan>),
    /// COPY TO STDOUT, run as a SELECT: the client's output format.
    Out(Arc<CopyOptions>),
}

/// What the server direction does for a COPY of the proxy's.
#[derive(Debug)]
pub(crate) enum CopyResponse {
    /// COPY FROM: the CopyInResponse shows the client's fields; the error
    /// that answers the proxy's CopyFail is replaced by the row's.
    In {
        fields: u16,
        failure: Mutex<Option<CopyFailure>>,
    },
    /// COPY TO: the SELECT's answer is shown as a COPY in this format.
    Out(Arc<CopyOptions>),
}

/// Why the proxy failed a COPY FROM.
#[derive(Debug, Clone)]
pub(crate) struct CopyFailure {
    sqlstate: &'static str,
    message: String,
    context: String,
}

impl CopyFailure {
    /// The ErrorResponse the client gets.
    pub(crate) fn to_bytes(&self) -> BytesMut {
        ErrorResponse {
            context: Some(&self.context),
            ..ErrorResponse::error(self.sqlstate, &self.message)
        }
        .to_bytes()
    }
}

/// The state of a COPY FROM STDIN in the client direction.
pub(crate) struct CopyIn {
    plan: Arc<CopyInPlan>,
    reader: RowReader,
    response: Arc<CopyResponse>,
    session_tenant: Option<String>,
    /// The proxy failed the COPY: the client's data is dropped until its
    /// CopyDone or CopyFail.
    failed: bool,
    /// The keys of the tenants met in the current message: the key service
    /// is asked once per tenant and message, not per row.
    keys: HashMap<String, TenantKeys>,
}

/// A tenant's current write key, and its blind-index key when the COPY
/// writes a blind index.
type TenantKeys = (crate::keys::WriteKey, Option<Arc<BlindIndexKey>>);

/// A row that cannot be stored.
struct RowFailure {
    sqlstate: &'static str,
    message: String,
    column: Option<String>,
}

impl From<CopyError> for RowFailure {
    fn from(e: CopyError) -> Self {
        Self {
            sqlstate: e.sqlstate,
            message: e.message,
            column: None,
        }
    }
}

impl From<Rejection> for RowFailure {
    fn from(r: Rejection) -> Self {
        Self {
            sqlstate: r.sqlstate,
            message: r.message,
            column: None,
        }
    }
}

impl CopyIn {
    /// Starts a COPY FROM; returns it and the response entry it shares with
    /// the server direction.
    pub(crate) fn start(
        plan: Arc<CopyInPlan>,
        session_tenant: Option<String>,
        max_row: usize,
    ) -> (Self, Arc<CopyResponse>) {
        let response = Arc::new(CopyResponse::In {
            fields: u16::try_from(plan.names.len()).unwrap_or(u16::MAX),
            failure: Mutex::new(None),
        });
        let reader = RowReader::new(plan.options.clone(), plan.names.clone(), max_row);
        let copy = Self {
            plan,
            reader,
            response: response.clone(),
            session_tenant,
            failed: false,
            keys: HashMap::new(),
        };
        (copy, response)
    }

    /// Handles a CopyData, CopyDone or CopyFail of the client; returns the
    /// bytes to send upstream and whether the COPY is over.
    pub(crate) async fn on_message(
        &mut self,
        frame: &[u8],
        encryption: &Encryption,
    ) -> (BytesMut, bool) {
        let tag = frame.first().copied().unwrap_or_default();
        let body = frame.get(HEADER_LEN..).unwrap_or_default();
        let over = tag != b'd';
        if self.failed {
            return (BytesMut::new(), over);
        }
        // Keys are looked up again for every message: a revocation or a
        // new DEK epoch takes effect within the COPY.
        self.keys.clear();
        let mut rows = Vec::with_capacity(body.len() + body.len() / 2);
        let result = match tag {
            b'd' => {
                self.reader.push(body);
                self.seal_rows(&mut rows, false, encryption).await
            }
            b'c' => self.seal_rows(&mut rows, true, encryption).await,
            // The client's CopyFail is relayed: the server fails the COPY.
            _ => return (BytesMut::from(frame), true),
        };
        let mut out = BytesMut::new();
        match result {
            Ok(()) => {
                if !rows.is_empty() {
                    encode::copy_data(&rows, &mut out);
                }
                if tag == b'c' {
                    encode::copy_done(&mut out);
                }
            }
            Err(failure) => {
                self.failed = true;
                let line = self.reader.line();
                let table = &self.plan.shown_table;
                let context = match &failure.column {
                    Some(column) => format!("COPY {table}, line {line}, column {column}"),
                    None => format!("COPY {table}, line {line}"),
                };
                encode::copy_fail(&format!("{} ({context})", failure.message), &mut out);
                if let CopyResponse::In { failure: slot, .. } = &*self.response {
                    if let Ok(mut slot) = slot.lock() {
                        *slot = Some(CopyFailure {
                            sqlstate: failure.sqlstate,
                            message: failure.message,
                            context,
                        });
                    }
                }
            }
        }
        (out, over)
    }

    /// Seals every complete row read so far into `out` (upstream text).
    async fn seal_rows(
        &mut self,
        out: &mut Vec<u8>,
        at_end: bool,
        encryption: &Encryption,
    ) -> Result<(), RowFailure> {
        while self.reader.next_row(at_end)? {
            self.seal_row(out, encryption).await?;
        }
        Ok(())
    }

    /// The tenant of the row read last.
    fn row_tenant(&self) -> Result<String, RowFailure> {
        let plan = &self.plan;
        let km004 = |message: String| RowFailure {
            sqlstate: KM004,
            message,
            column: Some(plan.tenant_column.clone()),
        };
        let named = plan
            .roles
            .iter()
            .position(|r| *r == CopyFieldRole::Tenant)
            .and_then(|index| self.reader.fields().get(index).copied());
        let Some(field) = named else {
            return self.session_tenant.clone().ok_or_else(|| {
                km004(format!(
                    "cmk-proxy: cannot determine the tenant of a row copied into {}",
                    plan.table
                ))
            });
        };
        let tenant = match self.reader.value(field).map(std::str::from_utf8) {
            Some(Ok(t)) if !t.is_empty() => t.to_owned(),
            _ => {
                return Err(km004(format!(
                    "cmk-proxy: the tenant of a row copied into {} is missing, NULL or not UTF-8",
                    plan.table
                )))
            }
        };
        match &self.session_tenant {
            Some(session) if *session != tenant => Err(km004(format!(
                "cmk-proxy: row tenant '{tenant}' of {} disagrees with the session tenant '{session}'",
                plan.table
            ))),
            _ => Ok(tenant),
        }
    }

    /// Seals the row read last and appends it to `out`.
    async fn seal_row(
        &mut self,
        out: &mut Vec<u8>,
        encryption: &Encryption,
    ) -> Result<(), RowFailure> {
        let tenant = self.row_tenant()?;
        let plan = self.plan.clone();
        if !self.keys.contains_key(&tenant) {
            let keys = encryption.keys();
            let key = keys
                .write_key(&tenant)
                .await
                .map_err(|e| key_rejection(&e, &plan.table))?;
            let searchable = plan.roles.iter().any(|r| {
                matches!(
                    r,
                    CopyFieldRole::Protected {
                        searchable: true,
                        ..
                    }
                )
            });
            let index_key = match searchable {
                true => Some(
                    keys.blind_index_key(&tenant)
                        .await
                        .map_err(|e| key_rejection(&e, &plan.table))?,
                ),
                false => None,
            };
            self.keys.insert(tenant.clone(), (key, index_key));
        }
        let Some((key, index_key)) = self.keys.get(&tenant) else {
            return Err(RowFailure::from(CopyError::new(
                "XX000",
                "no key".to_owned(),
            )));
        };
        let start = out.len();
        let mut indexes: Vec<Option<Vec<u8>>> = Vec::new();
        let mut first = true;
        let fields = self.reader.fields();
        for (role, field) in plan.roles.iter().zip(fields) {
            let value = self.reader.value(*field);
            if *role == CopyFieldRole::Ignored {
                continue;
            }
            if !std::mem::take(&mut first) {
                out.push(b'\t');
            }
            let CopyFieldRole::Protected {
                column,
                ty,
                searchable,
            } = role
            else {
                write_upstream_field(out, value);
                continue;
            };
            let Some(text) = value else {
                write_upstream_field(out, None);
                if *searchable {
                    indexes.push(None);
                }
                continue;
            };
            let invalid = |message: String, sqlstate| RowFailure {
                sqlstate,
                message,
                column: Some(column.clone()),
            };
            if text.contains(&0) {
                out.truncate(start);
                return Err(invalid(
                    "invalid byte sequence for encoding \"UTF8\": 0x00".to_owned(),
                    "22021",
                ));
            }
            let index_key = if *searchable {
                index_key.as_deref()
            } else {
                None
            };
            let sealed = seal_value(key, &tenant, &plan.table, column, *ty, text, index_key);
            let (cell, index) = match sealed {
                Ok(sealed) => sealed,
                Err(e) => {
                    out.truncate(start);
                    return Err(invalid(
                        format!("cmk-proxy: {}.{column}: {e}", plan.table),
                        "22P02",
                    ));
                }
            };
            write_upstream_bytea(out, &cell);
            if *searchable {
                indexes.push(index);
            }
        }
        if !plan.names_tenant() {
            if !std::mem::take(&mut first) {
                out.push(b'\t');
            }
            write_upstream_field(out, Some(tenant.as_bytes()));
        }
        if !first {
            out.push(b'\t');
        }
        write_upstream_field(out, Some(key.edek_json.as_bytes()));
        for index in indexes {
            out.push(b'\t');
            match index {
                Some(index) => write_upstream_bytea(out, &index),
                None => write_upstream_field(out, None),
            }
        }
        out.push(b'\n');
        Ok(())
    }
}

/// PostgreSQL's CONTEXT of an error in a COPY FROM (`COPY t, line 3,
/// column c: "<the line or value>"`) without the quoted part, which is the
/// proxy's upstream row (ciphertext, EDEK); every line before `: "` kept.
pub(crate) fn copy_context_without_line(context: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(context.len());
    for (index, line) in context.split(|b| *b == b'\n').enumerate() {
        if index > 0 {
            out.push(b'\n');
        }
        let quoted = line
            .starts_with(b"COPY ")
            .then(|| line.windows(3).position(|w| w == b": \""))
            .flatten();
        out.extend_from_slice(quoted.map_or(line, |at| &line[..at]));
    }
    out
}

/// The CopyInResponse the client gets: its own fields, text format.
pub(crate) fn copy_in_response(fields: u16) -> BytesMut {
    let mut out = BytesMut::with_capacity(8 + 2 * usize::from(fields));
    encode::copy_response(backend::COPY_IN_RESPONSE, fields, &mut out);
    out
}

/// The state of a COPY TO in the server direction.
#[derive(Debug)]
pub(crate) struct CopyOut {
    options: Arc<CopyOptions>,
    rows: u64,
}

impl CopyOut {
    /// Starts the COPY at the SELECT's RowDescription (`shown`: the one the
    /// client would see): its CopyOutResponse and header line.
    pub(crate) fn start(options: Arc<CopyOptions>, shown: &[u8]) -> (Self, BytesMut) {
        let fields = shown
            .get(HEADER_LEN..)
            .and_then(|body| decode_row_description(body).ok())
            .unwrap_or_default();
        let mut out = BytesMut::new();
        encode::copy_response(
            backend::COPY_OUT_RESPONSE,
            u16::try_from(fields.len()).unwrap_or(u16::MAX),
            &mut out,
        );
        if options.header {
            let names: Vec<Option<&[u8]>> =
                fields.iter().map(|f| Some(f.name.as_bytes())).collect();
            let mut line = Vec::new();
            write_client_row(&mut line, &options, &names);
            encode::copy_data(&line, &mut out);
        }
        (Self { options, rows: 0 }, out)
    }

    /// A (decrypted) DataRow as a CopyData line; other messages unchanged.
    pub(crate) fn row(&mut self, out: BytesMut) -> BytesMut {
        if out.first() != Some(&backend::DATA_ROW) {
            return out;
        }
        let Some(Ok(values)) = out.get(HEADER_LEN..).map(decode_data_row) else {
            return out;
        };
        let mut line = Vec::with_capacity(out.len());
        write_client_row(&mut line, &self.options, &values);
        self.rows += 1;
        let mut copy = BytesMut::with_capacity(line.len() + HEADER_LEN);
        encode::copy_data(&line, &mut copy);
        copy
    }

    /// The end of the SELECT: CopyDone and `COPY n`.
    pub(crate) fn end(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(20);
        encode::copy_done(&mut out);
        encode::command_complete(&format!("COPY {}", self.rows), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::copy_context_without_line;

    #[test]
    fn postgresqls_copy_context_loses_the_quoted_upstream_line() {
        let context = b"COPY patients, line 2, column tenant_id: \"\\\\x434d\"\nSQL statement \"x: \\\"y\\\"\"";
        assert_eq!(
            copy_context_without_line(context),
            b"COPY patients, line 2, column tenant_id\nSQL statement \"x: \\\"y\\\"\"".to_vec()
        );
    }
}
