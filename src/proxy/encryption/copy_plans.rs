//! The COPY of a simple query, planned against the session: a COPY FROM
//! needs a tenant for rows that name none; a COPY TO runs as the SELECT the
//! read analysis planned (rewrite/copy.rs).

use std::sync::Arc;

use super::{Encryption, SessionInfo};
use crate::proxy::copy::CopyRewrite;
use crate::rewrite::{CopyPlan, Rejection, KM004};

impl Encryption {
    /// The SQL sent upstream for a COPY, and what the session does with
    /// its data; `statements`: the number in the client's query string.
    pub(super) fn plan_copy(
        &self,
        plan: CopyPlan,
        statements: usize,
        session: &SessionInfo<'_>,
    ) -> Result<(String, CopyRewrite), Rejection> {
        let table = match &plan {
            CopyPlan::In(plan) => plan.table.clone(),
            CopyPlan::Out(_) => String::new(),
        };
        if statements > 1 {
            return Err(Rejection::unsupported(
                &table,
                None,
                "COPY in a query string with other statements",
            ));
        }
        match plan {
            CopyPlan::In(plan) => {
                if !plan.names_tenant() && session.tenant.is_none() {
                    return Err(Rejection {
                        sqlstate: KM004,
                        table: Some(plan.table.clone()),
                        column: Some(plan.tenant_column.clone()),
                        message: format!(
                            "cmk-proxy: cannot determine the tenant of the rows of a COPY into {}: \
                             name {} in the column list or SET {} first",
                            plan.table,
                            plan.tenant_column,
                            self.policy().tenant.session_setting
                        ),
                    });
                }
                Ok((plan.upstream_sql.clone(), CopyRewrite::In(Arc::new(plan))))
            }
            // Its SELECT was planned by the read analysis already.
            CopyPlan::Out(plan) => {
                let sql = plan.select_sql;
                Ok((sql, CopyRewrite::Out(Arc::new(plan.options))))
            }
        }
    }
}
