//! The upstream PostgreSQL address, read from a libpq connection string:
//! a `postgres://` / `postgresql://` URI or `key=value` pairs, with libpq's
//! rules (percent-decoding only, so `+` and `&` in a password are
//! themselves; quoted values with backslash escapes; query parameters that
//! override the URI's parts; JDBC's `ssl=true`). Keywords the proxy cannot
//! honour (several hosts, Unix sockets, certificate files: those are set
//! under `tls.upstream`) are refused rather than ignored.

use std::fmt;

use super::UpstreamTlsMode;

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
    /// `sslmode`, if given: it must agree with `tls.upstream.mode`.
    pub sslmode: Option<UpstreamTlsMode>,
    /// `options` (command-line options such as `-c x=y`) for the proxy's
    /// own connections.
    pub options: Option<String>,
}

/// Why an upstream connection string was rejected (libpq's wording where
/// libpq refuses the same string).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamAddrError {
    /// Malformed string.
    #[error("upstream connection string: {0}")]
    Syntax(String),
    /// A keyword libpq does not know.
    #[error("upstream connection string: invalid connection option \"{0}\"")]
    UnknownOption(String),
    /// A libpq keyword the proxy does not apply.
    #[error("upstream connection string: \"{0}\" is not supported by cmk-proxy{1}")]
    Unsupported(String, &'static str),
    /// A value the keyword does not take.
    #[error("upstream connection string: invalid {0} value \"{1}\"")]
    Value(&'static str, String),
    /// No host.
    #[error("the upstream connection string names no host")]
    NoHost,
}

type Error = UpstreamAddrError;

/// libpq keywords the proxy reads.
const READ: [&str; 7] = [
    "host", "port", "user", "password", "dbname", "sslmode", "options",
];
/// libpq's other keywords: accepted by libpq, not applied by the proxy.
const NOT_APPLIED: [&str; 30] = [
    "hostaddr",
    "passfile",
    "require_auth",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslnegotiation",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcertmode",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "target_session_attrs",
];

impl UpstreamAddr {
    /// Parses a libpq connection string (URI or `key=value` form).
    pub fn parse(text: &str) -> Result<Self, UpstreamAddrError> {
        let pairs = match ["postgresql://", "postgres://"]
            .iter()
            .find_map(|prefix| text.strip_prefix(prefix))
        {
            Some(rest) => uri_pairs(rest)?,
            None => key_value_pairs(text)?,
        };
        let mut found: [Option<String>; READ.len()] = Default::default();
        for (key, value) in pairs {
            match READ.iter().position(|k| *k == key) {
                Some(i) => found[i] = Some(value),
                None if NOT_APPLIED.contains(&key.as_str()) => {
                    let hint = if key.starts_with("ssl") {
                        " (set tls.upstream in the policy)"
                    } else {
                        ""
                    };
                    return Err(Error::Unsupported(key, hint));
                }
                None => return Err(Error::UnknownOption(key)),
            }
        }
        let [host, port, user, password, dbname, sslmode, options] = found;
        let host = host.filter(|h| !h.is_empty()).ok_or(Error::NoHost)?;
        if host.contains(',') {
            return Err(Error::Unsupported("several hosts".into(), ""));
        }
        if host.starts_with('/') || host.starts_with('@') {
            return Err(Error::Unsupported("a Unix-domain socket host".into(), ""));
        }
        Ok(Self {
            host,
            port: parse_port(port.as_deref())?,
            user: user.filter(|u| !u.is_empty()),
            password,
            dbname: dbname.filter(|d| !d.is_empty()),
            sslmode: sslmode.as_deref().map(parse_sslmode).transpose()?,
            options: options.filter(|o| !o.is_empty()),
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

/// libpq's port: an integer in 1..=65535 (spaces around it allowed), 5432
/// when empty or absent.
fn parse_port(port: Option<&str>) -> Result<u16, Error> {
    match port.map(|p| p.trim_matches(|c: char| c.is_ascii_whitespace())) {
        None | Some("") => Ok(5432),
        Some(p) if p.contains(',') => Err(Error::Unsupported("several ports".into(), "")),
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Error::Value("port", p.to_owned())),
    }
}

fn parse_sslmode(mode: &str) -> Result<UpstreamTlsMode, Error> {
    match mode {
        "disable" => Ok(UpstreamTlsMode::Disable),
        "prefer" => Ok(UpstreamTlsMode::Prefer),
        "require" => Ok(UpstreamTlsMode::Require),
        "verify-full" => Ok(UpstreamTlsMode::VerifyFull),
        "allow" | "verify-ca" => Err(Error::Unsupported(format!("sslmode={mode}"), "")),
        other => Err(Error::Value("sslmode", other.to_owned())),
    }
}

/// libpq's `conninfo_uri_parse_options` on what follows the scheme:
/// `[user[:password]@][host][:port][,…][/dbname][?key=value&…]`.
fn uri_pairs(rest: &str) -> Result<Vec<(String, String)>, Error> {
    let mut pairs = Vec::new();
    let mut rest = rest;
    // Credentials: up to an `@` that comes before any `/`.
    if let Some(at) = rest
        .find(['@', '/'])
        .filter(|i| rest.as_bytes()[*i] == b'@')
    {
        let credentials = &rest[..at];
        let (user, password) = match credentials.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (credentials, None),
        };
        if !user.is_empty() {
            pairs.push(("user".to_owned(), percent_decode(user)?));
        }
        if let Some(password) = password.filter(|p| !p.is_empty()) {
            pairs.push(("password".to_owned(), percent_decode(password)?));
        }
        rest = &rest[at + 1..];
    }
    // Hosts and ports, comma-separated; an IPv6 address in brackets.
    let (mut hosts, mut ports) = (Vec::new(), Vec::new());
    let terminator = loop {
        let host_end;
        if let Some(bracketed) = rest.strip_prefix('[') {
            let close = bracketed.find(']').ok_or_else(|| {
                Error::Syntax("end of string reached when looking for matching \"]\"".into())
            })?;
            if close == 0 {
                return Err(Error::Syntax("IPv6 host address may not be empty".into()));
            }
            hosts.push(&bracketed[..close]);
            rest = &bracketed[close + 1..];
            if !rest.is_empty() && !rest.starts_with([':', '/', '?', ',']) {
                return Err(Error::Syntax(
                    "unexpected character after IPv6 host address".into(),
                ));
            }
            host_end = 0;
        } else {
            host_end = rest.find([':', '/', '?', ',']).unwrap_or(rest.len());
            hosts.push(&rest[..host_end]);
        }
        rest = &rest[host_end..];
        let mut next = rest.chars().next();
        if next == Some(':') {
            let port_end = rest[1..]
                .find(['/', '?', ','])
                .map_or(rest.len(), |i| i + 1);
            ports.push(&rest[1..port_end]);
            rest = &rest[port_end..];
            next = rest.chars().next();
        } else {
            ports.push("");
        }
        if next != Some(',') {
            break next;
        }
        rest = &rest[1..];
    };
    let hosts = hosts.join(",");
    if !hosts.is_empty() {
        pairs.push(("host".to_owned(), percent_decode(&hosts)?));
    }
    let ports = ports.join(",");
    if ports.bytes().any(|b| b != b',') {
        pairs.push(("port".to_owned(), percent_decode(&ports)?));
    }
    if terminator == Some('/') {
        let path = &rest[1..];
        let end = path.find('?').unwrap_or(path.len());
        if end > 0 {
            pairs.push(("dbname".to_owned(), percent_decode(&path[..end])?));
        }
        rest = &path[end..];
    }
    if let Some(query) = rest.strip_prefix('?') {
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = param.split_once('=').ok_or_else(|| {
                Error::Syntax("missing key/value separator \"=\" in URI query parameter".into())
            })?;
            if value.contains('=') {
                return Err(Error::Syntax(
                    "extra key/value separator \"=\" in URI query parameter".into(),
                ));
            }
            let (key, value) = (percent_decode(key)?, percent_decode(value)?);
            if key == "ssl" && value == "true" {
                pairs.push(("sslmode".to_owned(), "require".to_owned()));
            } else {
                pairs.push((key, value));
            }
        }
    }
    Ok(pairs)
}

/// libpq's `conninfo_uri_decode`: `%XX` only; a bad escape or `%00` is an
/// error.
fn percent_decode(text: &str) -> Result<String, Error> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or_else(|| Error::Syntax("invalid percent-encoded token".into()))?;
        if hex == 0 {
            return Err(Error::Syntax(
                "forbidden value %00 in percent-encoded value".into(),
            ));
        }
        out.push(hex);
        i += 3;
    }
    String::from_utf8(out).map_err(|_| Error::Syntax("a value is not valid UTF-8".into()))
}

/// libpq's `conninfo_parse`: `key = value` pairs separated by spaces; a
/// value in single quotes may hold spaces; a backslash escapes the next
/// character, quoted or not.
fn key_value_pairs(text: &str) -> Result<Vec<(String, String)>, Error> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    let space = |c: &char| c.is_ascii_whitespace() || *c == '\u{b}';
    loop {
        while chars.next_if(space).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !space(c)) {
            key.push(c);
        }
        while chars.next_if(space).is_some() {}
        if chars.next() != Some('=') {
            return Err(Error::Syntax(format!(
                "missing \"=\" after \"{key}\" in connection info string"
            )));
        }
        while chars.next_if(space).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(Error::Syntax(
                            "unterminated quoted string in connection info string".into(),
                        ))
                    }
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !space(c)) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
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
    fn reads_passwords_and_names_as_libpq_does() {
        // libpq percent-decodes only: `+` and `&` are themselves.
        let a = UpstreamAddr::parse("postgres://a+b:p+q&r=s@h/d+b").unwrap();
        assert_eq!(a.user.as_deref(), Some("a+b"));
        assert_eq!(a.password.as_deref(), Some("p+q&r=s"));
        assert_eq!(a.dbname.as_deref(), Some("d+b"));
        let a = UpstreamAddr::parse(
            "postgresql://u:p%2Bq%20@[::1]:6543/app?sslmode=require&options=-c%20x%3Dy+z",
        )
        .unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", 6543));
        assert_eq!(a.password.as_deref(), Some("p+q "));
        assert_eq!(a.sslmode, Some(UpstreamTlsMode::Require));
        assert_eq!(a.options.as_deref(), Some("-c x=y+z"));
        // JDBC's ssl=true, and query parameters override the URI's parts.
        let a = UpstreamAddr::parse("postgres://h/app?ssl=true&dbname=other&port=7").unwrap();
        assert_eq!(a.sslmode, Some(UpstreamTlsMode::Require));
        assert_eq!((a.dbname.as_deref(), a.port), (Some("other"), 7));
        // An `@` in the password must be encoded; the first one ends it.
        let a = UpstreamAddr::parse("postgres://u:p:w@h").unwrap();
        assert_eq!(a.password.as_deref(), Some("p:w"));
    }

    #[test]
    fn reads_key_value_strings_as_libpq_does() {
        let a = UpstreamAddr::parse(
            r"host=db.example port = 6543 user=u password='it''s \'a b\\' dbname=app sslmode=verify-full options='-c search_path=x'",
        )
        .unwrap_err();
        // libpq has no '' inside quotes: the value ends there and `s` is a
        // keyword without `=`.
        assert!(a.to_string().contains("missing \"=\""), "{a}");
        let a = UpstreamAddr::parse(
            r"host=db.example port = 6543 user=u password='it\'s a b\\' dbname=app sslmode=verify-full options='-c search_path=x'",
        )
        .unwrap();
        assert_eq!((a.host.as_str(), a.port), ("db.example", 6543));
        assert_eq!(a.password.as_deref(), Some(r"it's a b\"));
        assert_eq!(a.dbname.as_deref(), Some("app"));
        assert_eq!(a.sslmode, Some(UpstreamTlsMode::VerifyFull));
        assert_eq!(a.options.as_deref(), Some("-c search_path=x"));
        let a = UpstreamAddr::parse(r"host=h password=a\ b+c%20").unwrap();
        assert_eq!(a.password.as_deref(), Some("a b+c%20"));
    }

    #[test]
    fn refuses_what_libpq_refuses_or_the_proxy_cannot_honour() {
        for bad in [
            "postgres://u:%zz@h",
            "postgres://u:%00@h",
            "postgres://h?nosuch=1",
            "postgres://h?sslmode",
            "postgres://h?sslmode=require=x",
            "postgres://[::1",
            "postgres://h:99999",
            "postgres://h:x",
            "host=h nosuch=1",
            "host=h password='open",
            "host",
            "postgres://h1,h2/db",
            "postgres:///db",
            "host=/var/run/postgresql",
            "postgres://h?sslmode=allow",
            "postgres://h?sslmode=verify-ca",
            "postgres://h?sslrootcert=/ca.pem",
        ] {
            assert!(UpstreamAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_port_and_rejects_other_schemes() {
        assert_eq!(UpstreamAddr::parse("postgresql://h").unwrap().port, 5432);
        assert!(UpstreamAddr::parse("mysql://h").is_err());
        assert!(UpstreamAddr::parse("nonsense").is_err());
    }
}
