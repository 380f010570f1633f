//! Sealing: the proxy's value of every placeholder of a planned write
//! (ciphertext, blind index, EDEK, tenant pin), of a lookup's blind
//! indexes and of an UNNEST insert's arrays, from the client's literals
//! or Bind parameters; and the Bind or SQL text that carries them.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;

use super::{key_rejection, Encryption, SessionInfo};
use crate::config::DeclaredType;
use crate::crypto::{self, CellAad};
use crate::keys::WriteKey;
use crate::protocol::messages::{format_of, Bind};
use crate::rewrite::{
    self, quote_literal, render_with_literals, Rejection, TenantSource, ValueSource, WritePlan,
};
use crate::values;

impl Encryption {
    /// Resolves the tenant of a row, refusing disagreements with the session.
    fn row_tenant(
        &self,
        source: &TenantSource,
        plan: &WritePlan,
        session: &SessionInfo<'_>,
        params: &ClientParams<'_>,
    ) -> Result<String, Rejection> {
        self.tenant_of(
            source,
            &plan.table,
            &plan.tenant_column,
            "a write to",
            session,
            params,
        )
    }

    /// Resolves a statement's tenant (`what` the statement does to `table`),
    /// refusing disagreements with the session (KM004).
    fn tenant_of(
        &self,
        source: &TenantSource,
        table: &str,
        tenant_column: &str,
        what: &str,
        session: &SessionInfo<'_>,
        params: &ClientParams<'_>,
    ) -> Result<String, Rejection> {
        let km004 = |message: String| Rejection {
            sqlstate: rewrite::KM004,
            table: Some(table.to_owned()),
            column: Some(tenant_column.to_owned()),
            message,
        };
        let named = match source {
            TenantSource::Literal(t) => t.clone(),
            TenantSource::Session => {
                return session.tenant.map(str::to_owned).ok_or_else(|| {
                    km004(format!(
                        "cmk-proxy: cannot determine the tenant of {what} {table}: set {tenant_column} in the statement or SET {} first",
                        self.policy().tenant.session_setting
                    ))
                })
            }
            TenantSource::Param(n) => match params.text(*n, None) {
                Ok(Some(t)) if !t.is_empty() => t,
                Ok(_) => {
                    return Err(km004(format!(
                        "cmk-proxy: the tenant of {what} {table} (parameter ${n}) is missing or NULL"
                    )))
                }
                Err(e) => return Err(km004(format!("cmk-proxy: tenant of {what} {table}: {e}"))),
            },
        };
        match session.tenant {
            Some(s) if s != named => Err(km004(format!(
                "cmk-proxy: tenant '{named}' of {what} {table} disagrees with the session tenant '{s}'"
            ))),
            _ => Ok(named),
        }
    }

    /// Computes the proxy's value of every placeholder of a planned write:
    /// ciphertext for each protected value, its blind index, the row's EDEK
    /// and the tenant pin.
    pub(super) async fn seal_write(
        &self,
        plan: &WritePlan,
        session: &SessionInfo<'_>,
        params: &ClientParams<'_>,
    ) -> Result<Slots, Rejection> {
        let mut slots = Slots::default();
        // Lookups first: a row's tenant may be the one a lookup pins (the
        // WHERE of an UPDATE by a protected value names it by its slot).
        for lookup in &plan.lookups {
            self.index_lookup(lookup, session, params, &mut slots)
                .await?;
        }
        for row in &plan.rows {
            let pinned = match row.tenant {
                TenantSource::Param(n) if plan.lookups.iter().any(|l| l.tenant_param == n) => {
                    match slots.get(n) {
                        Some(Slot::Text(tenant)) => Some(tenant.to_string()),
                        _ => None,
                    }
                }
                _ => None,
            };
            let tenant = match pinned {
                Some(tenant) => tenant,
                None => self.row_tenant(&row.tenant, plan, session, params)?,
            };
            if row.cells.is_empty() {
                continue;
            }
            let indexed = row.cells.iter().any(|c| c.bidx_param.is_some());
            let (key, index_key) = self.write_keys(&tenant, &plan.table, indexed).await?;
            for cell in &row.cells {
                let text = match &cell.value {
                    ValueSource::Literal(text) => Some(text.clone()),
                    ValueSource::Param(n) => params
                        .text(*n, Some(cell.ty))
                        .map_err(|e| invalid_value(&plan.table, &cell.column, &e))?,
                };
                let Some(text) = text else {
                    slots.insert(cell.target_param, Slot::Null);
                    if let Some(n) = cell.bidx_param {
                        slots.insert(n, Slot::Null);
                    }
                    continue;
                };
                let (ciphertext, bidx) = seal_value(
                    &key,
                    &tenant,
                    &plan.table,
                    &cell.column,
                    cell.ty,
                    text.as_bytes(),
                    cell.bidx_param.and(index_key.as_deref()),
                )
                .map_err(|e| invalid_value(&plan.table, &cell.column, &e))?;
                slots.insert(cell.target_param, Slot::Bytes(ciphertext));
                if let (Some(n), Some(index)) = (cell.bidx_param, bidx) {
                    slots.insert(n, Slot::Bytes(index));
                }
            }
            if let Some(n) = row.edek_param {
                slots.insert(n, Slot::Text(key.edek_json.clone()));
            }
        }
        if let Some(n) = plan.tenant_pin_param {
            let tenant = session.tenant.unwrap_or_default();
            slots.insert(n, Slot::Text(Arc::from(tenant)));
        }
        if let Some(unnest) = &plan.unnest {
            self.seal_unnest(plan, unnest, session, params, &mut slots)
                .await?;
        }
        for &n in &plan.cleared {
            slots.insert(n, Slot::Null);
        }
        Ok(slots)
    }

    /// The tenant's current write key, and its blind-index key when
    /// `indexed`. The index key is the tenant's, not the epoch's: equality
    /// search keeps finding rows written before a rotation.
    async fn write_keys(
        &self,
        tenant: &str,
        table: &str,
        indexed: bool,
    ) -> Result<(WriteKey, Option<Arc<crypto::BlindIndexKey>>), Rejection> {
        let key = self
            .keys
            .write_key(tenant)
            .await
            .map_err(|e| key_rejection(&e, table))?;
        let index = match indexed {
            true => Some(
                self.keys
                    .blind_index_key(tenant)
                    .await
                    .map_err(|e| key_rejection(&e, table))?,
            ),
            false => None,
        };
        Ok((key, index))
    }

    /// Seals the arrays of an UNNEST insert: row `i` (element `i` of every
    /// array, NULL past an array's end, as UNNEST pads) is sealed under the
    /// tenant of element `i` of the tenant array.
    async fn seal_unnest(
        &self,
        plan: &WritePlan,
        unnest: &rewrite::UnnestPlan,
        session: &SessionInfo<'_>,
        params: &ClientParams<'_>,
        slots: &mut Slots,
    ) -> Result<(), Rejection> {
        let array = |source: &rewrite::ArraySource, column: &str| {
            let elements = match source {
                rewrite::ArraySource::Literal(text) => values::parse_text_array(text).map(Some),
                rewrite::ArraySource::Param(n) => params.array(*n),
            };
            // A NULL array unnests to no rows.
            elements
                .map(Option::unwrap_or_default)
                .map_err(|e| invalid_value(&plan.table, column, &e))
        };
        let tenants = array(&unnest.tenants, &plan.tenant_column)?;
        let columns = unnest
            .cells
            .iter()
            .map(|c| array(&c.source, &c.column))
            .collect::<Result<Vec<_>, _>>()?;
        let rows = columns.iter().map(Vec::len).fold(tenants.len(), usize::max);
        let mut keys: HashMap<String, (WriteKey, Option<Arc<crypto::BlindIndexKey>>)> =
            HashMap::new();
        let mut cells: Vec<Vec<Option<Vec<u8>>>> = vec![Vec::with_capacity(rows); columns.len()];
        let mut indexes: Vec<Vec<Option<Vec<u8>>>> = vec![Vec::with_capacity(rows); columns.len()];
        let mut edeks: Vec<Option<Arc<str>>> = Vec::with_capacity(rows);
        for row in 0..rows {
            let named = tenants.get(row).cloned().flatten();
            let source = match named {
                Some(tenant) if !tenant.is_empty() => TenantSource::Literal(tenant),
                _ => {
                    return Err(Rejection {
                        sqlstate: rewrite::KM004,
                        table: Some(plan.table.clone()),
                        column: Some(plan.tenant_column.clone()),
                        message: format!(
                            "cmk-proxy: row {} of an UNNEST insert into {} has no tenant",
                            row + 1,
                            plan.table
                        ),
                    })
                }
            };
            let tenant = self.row_tenant(&source, plan, session, params)?;
            if !keys.contains_key(&tenant) {
                let indexed = unnest.cells.iter().any(|c| c.bidx_param.is_some());
                let found = self.write_keys(&tenant, &plan.table, indexed).await?;
                keys.insert(tenant.clone(), found);
            }
            let Some((key, index)) = keys.get(&tenant) else {
                continue;
            };
            for (c, spec) in unnest.cells.iter().enumerate() {
                let value = columns[c].get(row).cloned().flatten();
                let (cell, bidx) = match value {
                    Some(text) => seal_value(
                        key,
                        &tenant,
                        &plan.table,
                        &spec.column,
                        spec.ty,
                        text.as_bytes(),
                        spec.bidx_param.and(index.as_deref()),
                    )
                    .map(|(cell, bidx)| (Some(cell), bidx))
                    .map_err(|e| invalid_value(&plan.table, &spec.column, &e))?,
                    None => (None, None),
                };
                cells[c].push(cell);
                indexes[c].push(bidx);
            }
            edeks.push(Some(key.edek_json.clone()));
        }
        for (c, spec) in unnest.cells.iter().enumerate() {
            slots.insert(
                spec.target_param,
                Slot::Text(Arc::from(values::bytea_array_text(&cells[c]))),
            );
            if let Some(n) = spec.bidx_param {
                slots.insert(
                    n,
                    Slot::Text(Arc::from(values::bytea_array_text(&indexes[c]))),
                );
            }
        }
        let edeks: Vec<Option<&str>> = edeks.iter().map(|e| e.as_deref()).collect();
        slots.insert(
            unnest.edek_param,
            Slot::Text(Arc::from(values::quoted_array_text(&edeks))),
        );
        Ok(())
    }

    /// Computes the blind index of every value an equality lookup compares
    /// with, under its tenant's index key, and the tenant that pins it.
    async fn index_lookup(
        &self,
        lookup: &rewrite::Lookup,
        session: &SessionInfo<'_>,
        params: &ClientParams<'_>,
        slots: &mut Slots,
    ) -> Result<(), Rejection> {
        let tenant = self.tenant_of(
            &lookup.tenant,
            &lookup.table,
            &lookup.tenant_column,
            "an equality lookup on",
            session,
            params,
        )?;
        let key = self
            .keys
            .blind_index_key(&tenant)
            .await
            .map_err(|e| key_rejection(&e, &lookup.table))?;
        let invalid = |e: values::ValueError| invalid_value(&lookup.table, &lookup.column, &e);
        let index = |text: &str| -> Result<Vec<u8>, Rejection> {
            let canonical = values::canonical_text(lookup.ty, text.as_bytes()).map_err(invalid)?;
            Ok(crypto::blind_index(&key, canonical.as_bytes()).to_vec())
        };
        for slot in &lookup.values {
            let value = match &slot.value {
                rewrite::LookupValue::Literal(text) => text.clone(),
                rewrite::LookupValue::Param(n) => {
                    params.text(*n, Some(lookup.ty)).map_err(invalid)?
                }
                rewrite::LookupValue::ArrayParam(n) => {
                    let value = match params.array(*n).map_err(invalid)? {
                        Some(elements) => {
                            let indexes = elements
                                .iter()
                                .map(|e| e.as_deref().map(index).transpose())
                                .collect::<Result<Vec<_>, _>>()?;
                            Slot::Text(Arc::from(values::bytea_array_text(&indexes)))
                        }
                        None => Slot::Null,
                    };
                    slots.insert(slot.index_param, value);
                    continue;
                }
            };
            let value = match value {
                Some(text) => Slot::Bytes(index(&text)?),
                None => Slot::Null,
            };
            slots.insert(slot.index_param, value);
        }
        slots.insert(lookup.tenant_param, Slot::Text(Arc::from(tenant.as_str())));
        Ok(())
    }

    pub(super) async fn encrypt_literals(
        &self,
        plan: &WritePlan,
        session: &SessionInfo<'_>,
    ) -> Result<String, Rejection> {
        let slots = self.seal_write(plan, session, &ClientParams::None).await?;
        let literals: HashMap<usize, String> = slots
            .0
            .into_iter()
            .enumerate()
            .filter_map(|(n, slot)| Some((n, slot?)))
            .map(|(n, slot)| (n, slot.literal()))
            .collect();
        Ok(render_with_literals(&plan.statement, &literals))
    }

    /// Encrypts the protected values of a Bind for a planned write: returns
    /// the Bind that reaches PostgreSQL (ciphertext in binary format, the
    /// proxy's own parameters appended), of prepared statement `statement`.
    pub async fn encrypt_bind(
        &self,
        bind: &Bind<'_>,
        statement: &str,
        plan: &WritePlan,
        client_params: usize,
        declared: &[u32],
        session: &SessionInfo<'_>,
    ) -> Result<BytesMut, Rejection> {
        if bind.params.len() != client_params {
            return Err(Rejection {
                sqlstate: "08P01",
                table: Some(plan.table.clone()),
                column: None,
                message: format!(
                    "bind message supplies {} parameters, but prepared statement requires {client_params}",
                    bind.params.len()
                ),
            });
        }
        let params = ClientParams::Bind { bind, declared };
        let slots = self.seal_write(plan, session, &params).await?;
        let total = client_params + plan.extra_params;
        let mut values: Vec<Option<&[u8]>> = Vec::with_capacity(total);
        let mut formats: Vec<i16> = Vec::with_capacity(total);
        for n in 1..=total {
            match slots.get(n) {
                Some(Slot::Bytes(bytes)) => {
                    values.push(Some(bytes));
                    formats.push(1);
                }
                Some(Slot::Text(text)) => {
                    values.push(Some(text.as_bytes()));
                    formats.push(0);
                }
                Some(Slot::Null) => {
                    values.push(None);
                    formats.push(0);
                }
                None => {
                    values.push(bind.params.get(n - 1).copied().flatten());
                    formats.push(format_of(&bind.param_formats, n - 1));
                }
            }
        }
        let mut out = BytesMut::with_capacity(
            128 + values.iter().flatten().map(|v| v.len() + 4).sum::<usize>(),
        );
        Bind {
            portal: bind.portal,
            statement,
            param_formats: formats,
            params: values,
            result_formats: bind.result_formats.clone(),
        }
        .encode(&mut out);
        Ok(out)
    }
}

/// The proxy's value for one placeholder of a planned write.
pub(super) enum Slot {
    /// bytea (ciphertext, blind index): sent in binary.
    Bytes(Vec<u8>),
    /// Text (EDEK JSON, tenant).
    Text(Arc<str>),
    /// SQL NULL.
    Null,
}

/// The proxy's values of a planned write, by placeholder number (1-based).
#[derive(Default)]
pub(super) struct Slots(pub(super) Vec<Option<Slot>>);

impl Slot {
    /// The slot as an SQL literal (simple queries carry no parameters).
    pub(super) fn literal(&self) -> String {
        match self {
            Slot::Bytes(bytes) => bytea_literal(bytes),
            Slot::Text(text) => quote_literal(text),
            Slot::Null => "NULL".to_owned(),
        }
    }
}

impl Slots {
    fn insert(&mut self, n: usize, slot: Slot) {
        if self.0.len() <= n {
            self.0.resize_with(n + 1, || None);
        }
        self.0[n] = Some(slot);
    }

    pub(super) fn get(&self, n: usize) -> Option<&Slot> {
        self.0.get(n).and_then(Option::as_ref)
    }

    pub(super) fn take(&mut self, n: usize) -> Option<Slot> {
        self.0.get_mut(n).and_then(Option::take)
    }
}

/// The client's parameter values of a write: none (simple query), a
/// simple query's literals standing in for parameters, or a Bind.
pub(super) enum ClientParams<'a> {
    None,
    Literals(&'a [rewrite::Literal<'a>]),
    Bind {
        bind: &'a Bind<'a>,
        declared: &'a [u32],
    },
}

impl ClientParams<'_> {
    /// The text form of parameter `$n` (1-based); `None` for NULL. A binary
    /// value is read as the type the client declared for it, else as `ty`
    /// (the type the client was shown), else as text.
    fn text(
        &self,
        n: usize,
        ty: Option<DeclaredType>,
    ) -> Result<Option<String>, values::ValueError> {
        let not_bound = values::ValueError {
            ty: ty.map_or("text", DeclaredType::sql_name),
            reason: "a parameter that was not bound",
        };
        let (bind, declared) = match self {
            ClientParams::None => return Err(not_bound),
            ClientParams::Literals(literals) => {
                let literal = n.checked_sub(1).and_then(|i| literals.get(i));
                return literal.map(|l| Some(l.value.to_string())).ok_or(not_bound);
            }
            ClientParams::Bind { bind, declared } => (bind, declared),
        };
        let index = n.checked_sub(1).ok_or(not_bound.clone())?;
        let Some(value) = bind.params.get(index).ok_or(not_bound)? else {
            return Ok(None);
        };
        if format_of(&bind.param_formats, index) == 0 {
            return std::str::from_utf8(value)
                .map(|t| Some(t.to_owned()))
                .map_err(|_| values::ValueError {
                    ty: ty.map_or("text", DeclaredType::sql_name),
                    reason: "not valid UTF-8",
                });
        }
        let declared_oid = declared.get(index).copied().unwrap_or(0);
        let wire_type =
            match DeclaredType::from_oid(declared_oid) {
                Some(t) => t,
                None if declared_oid == 0 => ty.unwrap_or(DeclaredType::Text),
                None => return Err(values::ValueError {
                    ty: ty.map_or("text", DeclaredType::sql_name),
                    reason:
                        "a binary parameter of a type cmk-proxy cannot convert (send it as text)",
                }),
            };
        values::from_binary(wire_type, value).map(Some)
    }

    /// The elements of array parameter `$n` (1-based); `None` for NULL.
    fn array(&self, n: usize) -> Result<Option<Vec<Option<String>>>, values::ValueError> {
        let not_bound = values::ValueError {
            ty: "array",
            reason: "a parameter that was not bound",
        };
        let (bind, index) = match self {
            ClientParams::Bind { bind, .. } => (bind, n.checked_sub(1).ok_or(not_bound.clone())?),
            _ => {
                return match self.text(n, None)? {
                    Some(text) => values::parse_text_array(&text).map(Some),
                    None => Ok(None),
                }
            }
        };
        let Some(value) = bind.params.get(index).ok_or(not_bound)? else {
            return Ok(None);
        };
        if format_of(&bind.param_formats, index) == 0 {
            let text = std::str::from_utf8(value).map_err(|_| values::ValueError {
                ty: "array",
                reason: "not valid UTF-8",
            })?;
            return values::parse_text_array(text).map(Some);
        }
        values::parse_binary_array(value).map(Some)
    }
}

/// Encrypts one plaintext (text form) into a cell, and its blind index.
pub(crate) fn seal_value(
    key: &WriteKey,
    tenant: &str,
    table: &str,
    column: &str,
    ty: DeclaredType,
    text: &[u8],
    index_key: Option<&crypto::BlindIndexKey>,
) -> Result<(Vec<u8>, Option<Vec<u8>>), values::ValueError> {
    let canonical = values::canonical_text(ty, text)?;
    let aad = CellAad {
        tenant_id: tenant,
        table,
        column,
    };
    let cell = key.dek.seal(&aad, canonical.as_bytes());
    let index = index_key.map(|k| crypto::blind_index(k, canonical.as_bytes()).to_vec());
    Ok((cell, index))
}

/// `E'\\x..'`: bytea hex input that reads the same whatever the session's
/// `standard_conforming_strings`.
fn bytea_literal(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(6 + bytes.len() * 2);
    out.push_str("E'\\\\x");
    out.push_str(&faster_hex::hex_string(bytes));
    out.push('\'');
    out
}

fn invalid_value(table: &str, column: &str, e: &values::ValueError) -> Rejection {
    Rejection {
        sqlstate: "22P02",
        table: Some(table.to_owned()),
        column: Some(column.to_owned()),
        message: format!("cmk-proxy: {table}.{column}: {e}"),
    }
}
