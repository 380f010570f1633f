//! Loading a policy file and validating what serde cannot: every semantic
//! problem is collected with its path, so one run reports them all.

use std::fmt;
use std::path::{Path, PathBuf};

use super::types::{AuditSink, Policy, ProviderConfig, UpstreamTlsMode};

/// One problem found in a policy, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted path of the offending key (`tables.public.patients.columns`),
    /// or `line:column` for syntax errors.
    pub location: String,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read policy file {path}: {source}")]
    Read {
        /// File that failed.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read but is invalid; every problem is listed.
    #[error("invalid policy {origin}:\n{}", render(.problems))]
    Invalid {
        /// File name (or `<inline>`).
        origin: String,
        /// Every problem found.
        problems: Vec<ConfigProblem>,
    },
}

fn render(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads and validates a policy file.
pub fn load_policy(path: &Path) -> Result<Policy, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut policy = parse_policy(&text, &path.display().to_string())?;
    resolve_relative_paths(&mut policy, base);
    let problems = validate_files(&policy);
    if problems.is_empty() {
        Ok(policy)
    } else {
        Err(ConfigError::Invalid {
            origin: path.display().to_string(),
            problems,
        })
    }
}

/// Parses and validates policy text (file paths are not checked here).
pub fn parse_policy(text: &str, origin: &str) -> Result<Policy, ConfigError> {
    let policy: Policy = serde_saphyr::from_str(text).map_err(|e| ConfigError::Invalid {
        origin: origin.to_owned(),
        problems: vec![syntax_problem(&e)],
    })?;
    let problems = validate(&policy);
    if problems.is_empty() {
        Ok(policy)
    } else {
        Err(ConfigError::Invalid {
            origin: origin.to_owned(),
            problems,
        })
    }
}

fn syntax_problem(e: &serde_saphyr::Error) -> ConfigProblem {
    let location = e
        .location()
        .map(|l| format!("line {} column {}", l.line(), l.column()))
        .unwrap_or_else(|| "document".to_owned());
    let message = e.to_string();
    ConfigProblem { location, message }
}

fn problem(location: impl Into<String>, message: impl Into<String>) -> ConfigProblem {
    ConfigProblem {
        location: location.into(),
        message: message.into(),
    }
}

/// Semantic checks that need no file system or database.
fn validate(policy: &Policy) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    match super::UpstreamAddr::parse(&policy.upstream) {
        Err(e) => problems.push(problem("upstream", e.to_string())),
        Ok(addr) => {
            if addr
                .sslmode
                .is_some_and(|mode| mode != policy.tls.upstream.mode)
            {
                problems.push(problem(
                    "upstream",
                    format!(
                        "sslmode in the connection string disagrees with tls.upstream.mode \
                         ({:?}): set one of them",
                        policy.tls.upstream.mode
                    ),
                ));
            }
        }
    }
    if policy.tls.upstream.mode == UpstreamTlsMode::VerifyFull
        && policy.tls.upstream.server_name.as_deref() == Some("")
    {
        problems.push(problem("tls.upstream.server_name", "must not be empty"));
    }
    if policy.tls.upstream.cert.is_some() != policy.tls.upstream.key.is_some() {
        problems.push(problem(
            "tls.upstream",
            "cert and key must be given together",
        ));
    }
    if policy.server.catalog_refresh.is_zero() {
        problems.push(problem(
            "server.catalog_refresh",
            "must be greater than zero",
        ));
    }
    if policy.server.plan_cache_size == 0 {
        problems.push(problem(
            "server.plan_cache_size",
            "must be greater than zero",
        ));
    }
    if policy.keys.approval_ttl.is_zero() {
        problems.push(problem("keys.approval_ttl", "must be greater than zero"));
    }
    if policy.keys.dek_max_cells == 0 {
        problems.push(problem("keys.dek_max_cells", "must be greater than zero"));
    }
    if policy.audit.queue_capacity == 0 {
        problems.push(problem("audit.queue_capacity", "must be greater than zero"));
    }
    if policy.tenant.session_setting.is_empty() || !policy.tenant.session_setting.contains('.') {
        problems.push(problem(
            "tenant.session_setting",
            "must be a custom setting with a dot, e.g. cmk.tenant_id",
        ));
    }
    for (name, seed) in &policy.tenants {
        if !policy.keys.providers.contains_key(&seed.provider) {
            problems.push(problem(
                format!("tenants.{name}.provider"),
                format!(
                    "unknown provider '{}' (known: {})",
                    seed.provider,
                    known(policy.keys.providers.keys())
                ),
            ));
        }
        if seed.key.is_empty() {
            problems.push(problem(format!("tenants.{name}.key"), "must not be empty"));
        }
    }
    for (name, table) in &policy.tables {
        let at = format!("tables.{name}");
        if split_table_name(name).is_none() {
            problems.push(problem(
                &at,
                "table must be written as schema.table (e.g. public.patients)",
            ));
        }
        if table.columns.is_empty() {
            problems.push(problem(
                format!("{at}.columns"),
                "names no protected column",
            ));
        }
        for column in [&table.tenant_column, &table.edek_column] {
            if table.columns.contains_key(column) {
                problems.push(problem(
                    format!("{at}.columns.{column}"),
                    "the tenant and EDEK columns cannot themselves be protected",
                ));
            }
        }
        if table.tenant_column == table.edek_column {
            problems.push(problem(
                format!("{at}.edek_column"),
                "must differ from tenant_column",
            ));
        }
    }
    problems
}

fn known<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let list: Vec<&str> = names.map(String::as_str).collect();
    if list.is_empty() {
        "none configured".to_owned()
    } else {
        list.join(", ")
    }
}

/// Splits `schema.table` into its two parts.
pub fn split_table_name(name: &str) -> Option<(&str, &str)> {
    let (schema, table) = name.split_once('.')?;
    (!schema.is_empty() && !table.is_empty() && !table.contains('.')).then_some((schema, table))
}

fn resolve_relative_paths(policy: &mut Policy, base: &Path) {
    let fix = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    if let Some(client) = policy.tls.client.as_mut() {
        fix(&mut client.cert);
        fix(&mut client.key);
    }
    if let Some(ca) = policy.tls.upstream.ca.as_mut() {
        fix(ca);
    }
    for provider in policy.keys.providers.values_mut() {
        match provider {
            ProviderConfig::Local { path } => fix(path),
            ProviderConfig::Pkcs11 {
                module, pin_file, ..
            } => {
                fix(module);
                if let Some(pin_file) = pin_file {
                    fix(pin_file);
                }
            }
            ProviderConfig::Kmip {
                ca,
                client_cert,
                client_key,
                ..
            } => {
                fix(ca);
                fix(client_cert);
                fix(client_key);
            }
            ProviderConfig::VaultTransit {
                ca,
                token_file,
                secret_id_file,
                jwt_file,
                ..
            } => {
                for path in [ca, token_file, secret_id_file, jwt_file]
                    .into_iter()
                    .flatten()
                {
                    fix(path);
                }
            }
            ProviderConfig::GcpKms {
                credentials_file,
                ca,
                ..
            } => {
                for path in [credentials_file, ca].into_iter().flatten() {
                    fix(path);
                }
            }
            ProviderConfig::AzureKeyVault {
                ca,
                client_secret_file,
                federated_token_file,
                ..
            } => {
                for path in [ca, client_secret_file, federated_token_file]
                    .into_iter()
                    .flatten()
                {
                    fix(path);
                }
            }
            _ => {}
        }
    }
    match &mut policy.audit.sink {
        AuditSink::File { path } => fix(path),
        AuditSink::TenantFiles { dir } => fix(dir),
        _ => {}
    }
}

/// Checks that referenced certificate files exist.
fn validate_files(policy: &Policy) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    if let Some(client) = &policy.tls.client {
        for (key, path) in [
            ("tls.client.cert", &client.cert),
            ("tls.client.key", &client.key),
        ] {
            if !path.is_file() {
                problems.push(problem(
                    key,
                    format!("file {} does not exist", path.display()),
                ));
            }
        }
    }
    if let Some(ca) = &policy.tls.upstream.ca {
        if !ca.is_file() {
            problems.push(problem(
                "tls.upstream.ca",
                format!("file {} does not exist", ca.display()),
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_reported_with_its_line() {
        let err = parse_policy("listen: 127.0.0.1:1\nlisten_typo: 3\n", "t").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("listen_typo"), "{text}");
        assert!(text.contains("line 2"), "{text}");
    }

    #[test]
    fn bad_listen_address_is_reported() {
        let err = parse_policy("listen: not-an-address\n", "t").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn missing_required_field_is_reported() {
        let err = parse_policy("tables:\n  public.t:\n    columns: {}\n", "t").unwrap_err();
        assert!(err.to_string().contains("tenant_column"), "{err}");
    }

    #[test]
    fn all_semantic_problems_are_reported_at_once() {
        let text = "upstream: mysql://x\ntenants:\n  acme: {provider: nope, key: k}\ntables:\n  patients:\n    tenant_column: t\n    columns: {}\n";
        let Err(ConfigError::Invalid { problems, .. }) = parse_policy(text, "t") else {
            panic!("expected invalid");
        };
        let locations: Vec<&str> = problems.iter().map(|p| p.location.as_str()).collect();
        assert!(locations.contains(&"upstream"), "{locations:?}");
        assert!(
            locations.contains(&"tenants.acme.provider"),
            "{locations:?}"
        );
        assert!(locations.contains(&"tables.patients"), "{locations:?}");
        assert!(
            locations.contains(&"tables.patients.columns"),
            "{locations:?}"
        );
    }

    #[test]
    fn upstream_sslmode_must_agree_with_tls_upstream_mode() {
        let text = "upstream: postgres://h/app?sslmode=require\n";
        let Err(ConfigError::Invalid { problems, .. }) = parse_policy(text, "t") else {
            panic!("expected invalid");
        };
        assert!(problems[0].message.contains("sslmode"), "{problems:?}");
        let agreeing =
            "upstream: postgres://u:a+b@h/app?sslmode=disable\ntls: {upstream: {mode: disable}}\n";
        assert!(parse_policy(agreeing, "t").is_ok());
        assert!(parse_policy("upstream: host=h dbname=app\n", "t").is_ok());
    }

    #[test]
    fn empty_policy_is_a_passthrough_proxy() {
        let policy = parse_policy("{}", "t").unwrap();
        assert!(policy.tables.is_empty());
    }
}
