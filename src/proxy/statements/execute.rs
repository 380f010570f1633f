//! An Execute of a portal, and a Bind whose protected parameters are sealed
//! before it is sent.

use super::*;

impl ClientStatements {
    pub(super) fn execute(
        &mut self,
        frame: &[u8],
        body: &[u8],
        state: &SessionState,
    ) -> ClientStep {
        let portal = cstr(body).map_or_else(|| self.portal(""), |name| self.portal(name));
        if portal.statement.drops_statements {
            state.own_statements(OwnStatements::clear);
        }
        if let StatementKind::SetTenant(change) = &portal.statement.kind {
            state.change_tenant(change.clone(), true);
        }
        if let Some(change) = &portal.tenant_change {
            state.change_tenant(change.clone(), true);
        }
        let describe = !portal.described.load(Ordering::Acquire)
            && !portal.statement.described.load(Ordering::Acquire);
        if !describe {
            state.pending.push(Expected::Execute(portal));
            return ClientStep::Forward;
        }
        // The client never asked for the result columns (it knows them from
        // elsewhere): the proxy asks, and keeps the answer to itself.
        portal.described.store(true, Ordering::Release);
        let name = cstr(body).unwrap_or_default();
        let mut out = BytesMut::with_capacity(name.len() + 7 + frame.len());
        describe_portal(&mut out, name);
        out.extend_from_slice(frame);
        state.pending.push(Expected::DescribePortal {
            portal: portal.clone(),
            swallow: true,
        });
        state.pending.push(Expected::Execute(portal));
        ClientStep::Replace(out)
    }

    pub(super) async fn encrypt_bind(
        &mut self,
        frame: &[u8],
        body: &[u8],
        encryption: &Encryption,
        state: &SessionState,
    ) -> BytesMut {
        let Ok(bind) = Bind::decode(body) else {
            state.pending.push(Expected::bind());
            return BytesMut::from(frame);
        };
        let statement = self.statement(bind.statement);
        self.bind_portal(&bind, statement.clone(), None);
        let StatementKind::Write(plan) = &statement.kind else {
            state.pending.push(Expected::bind());
            return BytesMut::from(frame);
        };
        let tenant = state.tenant();
        let info = state.session_info(tenant.as_deref());
        let mut out = BytesMut::new();
        let own = statement
            .runs_as
            .as_ref()
            .map(|runs_as| own_statement_of(runs_as, encryption, state, &mut out))
            .transpose();
        let encrypted = match own {
            Ok(own) => {
                let name = own
                    .as_ref()
                    .map_or(bind.statement, |(_, name)| name.as_str());
                describe_for_origins(&statement, name, encryption, state, &mut out);
                let encrypted = encryption
                    .encrypt_bind(
                        &bind,
                        name,
                        plan,
                        statement.client_params,
                        &statement.declared,
                        &info,
                    )
                    .await;
                encrypted.map(|bound| (own.map(|(number, _)| number), bound))
            }
            Err(rejection) => Err(rejection),
        };
        match encrypted {
            Ok((own, bound)) => {
                state.pending.push(Expected::Bind { refusal: None, own });
                if out.is_empty() {
                    return bound;
                }
                out.extend_from_slice(&bound);
                out
            }
            Err(rejection) => {
                // The proxy's statement parsed above (if any) stays, unused.
                state.pending.push(Expected::Bind {
                    refusal: Some(audited(encryption, &info, rejection)),
                    own: None,
                });
                Bind {
                    portal: bind.portal,
                    statement: REFUSED_STATEMENT,
                    param_formats: Vec::new(),
                    params: Vec::new(),
                    result_formats: Vec::new(),
                }
                .encode(&mut out);
                out
            }
        }
    }
}
