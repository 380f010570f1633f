//! The upstream PostgreSQL address, parsed from a `postgres://` URL.

use std::fmt;

/// Where the proxy connects, and the credentials it uses for its own
/// registry connection (client sessions bring their own user and database).
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamAddr {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// User for the proxy's own connection (registry), if given.
    pub user: Option<String>,
    /// Password for the proxy's own connection, if given.
    pub password: Option<String>,
    /// Database for the proxy's own connection, if given.
    pub dbname: Option<String>,
}

/// Why an upstream URL was rejected.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamAddrError {
    /// Not a URL at all.
    #[error("'{0}' is not a URL like postgres://host:5432/db ({1})")]
    NotUrl(String, url::ParseError),
    /// Wrong scheme.
    #[error("scheme '{0}' is not postgres:// or postgresql://")]
    Scheme(String),
    /// No host.
    #[error("the upstream URL names no host")]
    NoHost,
}

impl UpstreamAddr {
    /// Parses `postgres://[user[:password]@]host[:port][/dbname]`.
    pub fn parse(text: &str) -> Result<Self, UpstreamAddrError> {
        let url =
            url::Url::parse(text).map_err(|e| UpstreamAddrError::NotUrl(text.to_owned(), e))?;
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err(UpstreamAddrError::Scheme(url.scheme().to_owned()));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or(UpstreamAddrError::NoHost)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let decode = |s: &str| {
            url::form_urlencoded::parse(s.as_bytes())
                .map(|(k, v)| format!("{k}{v}"))
                .collect::<String>()
        };
        let user = Some(url.username()).filter(|u| !u.is_empty()).map(decode);
        let password = url.password().map(decode);
        let dbname = Some(url.path().trim_start_matches('/'))
            .filter(|d| !d.is_empty())
            .map(decode);
        Ok(Self {
            host,
            port: url.port().unwrap_or(5432),
            user,
            password,
            dbname,
        })
    }

    /// `host:port`, as used for connecting and in error messages.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Never prints the password.
impl fmt::Debug for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamAddr")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_url() {
        let a = UpstreamAddr::parse("postgres://u:p%40ss@db.example:6543/app").unwrap();
        assert_eq!(a.host, "db.example");
        assert_eq!(a.port, 6543);
        assert_eq!(a.user.as_deref(), Some("u"));
        assert_eq!(a.password.as_deref(), Some("p@ss"));
        assert_eq!(a.dbname.as_deref(), Some("app"));
        assert!(!format!("{a:?}").contains("p@ss"));
    }

    #[test]
    fn defaults_port_and_rejects_other_schemes() {
        assert_eq!(UpstreamAddr::parse("postgresql://h").unwrap().port, 5432);
        assert!(UpstreamAddr::parse("mysql://h").is_err());
        assert!(UpstreamAddr::parse("nonsense").is_err());
    }
}
