//! Azure key references, `https://VAULT.vault.azure.net/keys/NAME[/VERSION]`:
//! which hosts they may name (Azure's vault and Managed HSM domains of each
//! cloud, plus hosts the operator allowed by name) and which token scope
//! each needs. A reference never sends a token to an arbitrary host.

use url::Url;

/// Azure's key domains and the token scope of each (public, China and US
/// Government clouds; vaults and Managed HSMs).
const CLOUD_DOMAINS: &[(&str, &str)] = &[
    ("vault.azure.net", "https://vault.azure.net/.default"),
    (
        "managedhsm.azure.net",
        "https://managedhsm.azure.net/.default",
    ),
    ("vault.azure.cn", "https://vault.azure.cn/.default"),
    (
        "managedhsm.azure.cn",
        "https://managedhsm.azure.cn/.default",
    ),
    (
        "vault.usgovcloudapi.net",
        "https://vault.usgovcloudapi.net/.default",
    ),
    (
        "managedhsm.usgovcloudapi.net",
        "https://managedhsm.usgovcloudapi.net/.default",
    ),
];

/// Scope of tokens for an allowed host when the policy names none.
pub const DEFAULT_SCOPE: &str = "https://vault.azure.net/.default";

/// Hosts a key ref may name besides Azure's own domains.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    /// `host` or `host:port`, lower case.
    pub hosts: Vec<String>,
    /// Token scope for them.
    pub scope: String,
}

/// A parsed key reference (or a `kid`, which is one with a version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    /// `https://host[:port]`.
    pub base: String,
    /// The key's name.
    pub name: String,
    /// A pinned version, if any.
    pub version: Option<String>,
    /// Token scope for this host.
    pub scope: String,
}

/// Key names: 1-127 letters, digits and dashes (Key Vault's naming rule).
fn valid_name(name: &str) -> bool {
    (1..=127).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Versions are 32 hex digits at Azure; accept letters and digits, bounded.
fn valid_version(version: &str) -> bool {
    (1..=64).contains(&version.len()) && version.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Vault and HSM names: 3-24 letters, digits and dashes.
fn valid_vault(label: &str) -> bool {
    (3..=24).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl KeyRef {
    /// Parses and checks `text`; the error says what is wrong.
    pub fn parse(text: &str, allowed: &AllowedHosts) -> Result<KeyRef, String> {
        let url = Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
        if url.scheme() != "https" {
            return Err("not an https URL".to_owned());
        }
        if !url.username().is_empty()
            || url.password().is_some()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err("has credentials, a query or a fragment".to_owned());
        }
        let host = url.host_str().ok_or("has no host")?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let scope = if allowed.hosts.contains(&authority) {
            allowed.scope.clone()
        } else {
            let cloud = CLOUD_DOMAINS.iter().find(|(domain, _)| {
                host.strip_suffix(domain)
                    .and_then(|rest| rest.strip_suffix('.'))
                    .is_some_and(valid_vault)
            });
            match (cloud, url.port()) {
                (Some((_, scope)), None) => (*scope).to_owned(),
                _ => {
                    return Err(format!(
                        "host {authority} is not an Azure Key Vault or Managed HSM \
                         and not in allowed_hosts"
                    ))
                }
            }
        };
        let path = url.path().strip_suffix('/').unwrap_or(url.path());
        let segments: Vec<&str> = path.split('/').collect();
        let (name, version) = match segments.as_slice() {
            ["", "keys", name] => (*name, None),
            ["", "keys", name, version] => (*name, Some(*version)),
            _ => return Err("path is not /keys/NAME[/VERSION]".to_owned()),
        };
        if !valid_name(name) || !version.is_none_or(valid_version) {
            return Err("bad key name or version".to_owned());
        }
        Ok(KeyRef {
            base: format!("https://{authority}"),
            name: name.to_owned(),
            version: version.map(str::to_owned),
            scope,
        })
    }

    /// `base/keys/NAME[/VERSION][/OPERATION]?api-version=7.4`; a read of the
    /// latest version is `base/keys/NAME/?api-version=7.4`, as documented.
    pub fn url(&self, operation: Option<&str>) -> String {
        let mut url = format!("{}/keys/{}", self.base, self.name);
        for part in [self.version.as_deref(), operation].into_iter().flatten() {
            url.push('/');
            url.push_str(part);
        }
        if self.version.is_none() && operation.is_none() {
            url.push('/');
        }
        url.push_str("?api-version=7.4");
        url
    }

    /// True when `other` is a version of this key (same host and name).
    pub fn same_key(&self, other: &KeyRef) -> bool {
        self.base == other.base && self.name == other.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> AllowedHosts {
        AllowedHosts {
            hosts: vec![],
            scope: DEFAULT_SCOPE.to_owned(),
        }
    }

    #[test]
    fn azure_refs_parse_with_their_cloud_scope() {
        let k = KeyRef::parse("https://acme-kv.vault.azure.net/keys/tenant-key", &none()).unwrap();
        assert_eq!(k.base, "https://acme-kv.vault.azure.net");
        assert_eq!(k.name, "tenant-key");
        assert_eq!(k.version, None);
        assert_eq!(k.scope, "https://vault.azure.net/.default");
        assert_eq!(
            k.url(None),
            "https://acme-kv.vault.azure.net/keys/tenant-key/?api-version=7.4"
        );
        let v = "0123456789abcdef0123456789abcdef";
        let k = KeyRef::parse(
            &format!("https://Acme.ManagedHSM.azure.net/keys/k1/{v}/"),
            &none(),
        )
        .unwrap();
        assert_eq!(k.version.as_deref(), Some(v));
        assert_eq!(k.base, "https://acme.managedhsm.azure.net");
        assert_eq!(k.scope, "https://managedhsm.azure.net/.default");
        assert_eq!(
            k.url(Some("unwrapkey")),
            format!("https://acme.managedhsm.azure.net/keys/k1/{v}/unwrapkey?api-version=7.4")
        );
        let k = KeyRef::parse("https://gov-kv.vault.usgovcloudapi.net/keys/k", &none()).unwrap();
        assert_eq!(k.scope, "https://vault.usgovcloudapi.net/.default");
        let k = KeyRef::parse("https://cn-kv.vault.azure.cn/keys/k", &none()).unwrap();
        assert_eq!(k.scope, "https://vault.azure.cn/.default");
    }

    #[test]
    fn refs_to_other_hosts_or_shapes_are_refused() {
        for bad in [
            "http://acme.vault.azure.net/keys/k",
            "https://acme.vault.azure.net.evil.example/keys/k",
            "https://evil.example/keys/k",
            "https://vault.azure.net/keys/k",
            "https://a.b.vault.azure.net/keys/k",
            "https://acme.vault.azure.net:8443/keys/k",
            "https://user:pw@acme.vault.azure.net/keys/k",
            "https://acme.vault.azure.net/keys/k?x=1",
            "https://acme.vault.azure.net/secrets/k",
            "https://acme.vault.azure.net/keys/",
            "https://acme.vault.azure.net/keys/k/v/wrapkey",
            "https://acme.vault.azure.net/keys/k%2Fx",
            "https://acme.vault.azure.net/keys/../k",
            "https://127.0.0.1:8443/keys/k",
            "acme-key",
        ] {
            assert!(KeyRef::parse(bad, &none()).is_err(), "{bad}");
        }
    }

    #[test]
    fn allowed_hosts_take_the_configured_scope_and_exact_port() {
        let allowed = AllowedHosts {
            hosts: vec!["127.0.0.1:8443".to_owned()],
            scope: "https://test/.default".to_owned(),
        };
        let k = KeyRef::parse("https://127.0.0.1:8443/keys/k/v2", &allowed).unwrap();
        assert_eq!(k.scope, "https://test/.default");
        assert!(KeyRef::parse("https://127.0.0.1:8444/keys/k", &allowed).is_err());
        let other = KeyRef::parse("https://127.0.0.1:8443/keys/k", &allowed).unwrap();
        assert!(k.same_key(&other));
        let renamed = KeyRef::parse("https://127.0.0.1:8443/keys/j/v2", &allowed).unwrap();
        assert!(!k.same_key(&renamed));
    }
}
