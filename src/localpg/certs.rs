//! Certificates for a throwaway cluster's TLS: a fresh CA with server and
//! client certificates (X.509 v3), or a self-signed v1 certificate as Citus
//! makes.

use super::*;

/// PEM files of a CA and a server certificate signed by it.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// Server certificate (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM, PKCS#8, mode 0600).
    pub key: PathBuf,
    /// Client certificate (PEM) for the role `cert_user`, signed by the CA;
    /// the local cluster authenticates that role with it (`cert` in pg_hba).
    pub client_cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub client_key: PathBuf,
}

/// Writes a fresh CA (`ca.crt`) and a server certificate (`server.crt`,
/// `server.key`) for `names` (DNS names or IP addresses) into `dir`.
pub fn write_ca_and_server_cert(dir: &Path, names: &[&str]) -> Result<CertFiles, LocalPgError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "cmk-proxy test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("localhost"),
    );
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca, &ca_key)?;

    let files = CertFiles {
        ca_cert: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        client_cert: dir.join("cert_user.crt"),
        client_key: dir.join("cert_user.key"),
    };
    write_file(&files.ca_cert, ca.pem().as_bytes(), 0o644)?;
    let client_key = KeyPair::generate()?;
    let mut client = CertificateParams::new(Vec::<String>::new())?;
    client
        .distinguished_name
        .push(DnType::CommonName, "cert_user");
    let client = client.signed_by(&client_key, &ca, &ca_key)?;
    write_file(&files.client_cert, client.pem().as_bytes(), 0o644)?;
    write_file(
        &files.client_key,
        client_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&files.cert, cert.pem().as_bytes(), 0o644)?;
    write_file(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    Ok(files)
}

/// Writes a self-signed X.509 version 1 certificate for `localhost` with
/// the openssl CLI (`x509 -req` without extensions), as `server.crt` /
/// `server.key`, and the same certificate as `ca.crt`.
pub fn write_self_signed_v1_cert(dir: &Path) -> Result<CertFiles, LocalPgError> {
    let files = CertFiles {
        ca_cert: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        client_cert: dir.join("server.crt"),
        client_key: dir.join("server.key"),
    };
    let csr = dir.join("server.csr");
    run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&files.key)
        .arg("-out")
        .arg(&csr))?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "3650", "-in"])
        .arg(&csr)
        .arg("-signkey")
        .arg(&files.key)
        .arg("-out")
        .arg(&files.cert))?;
    fs::remove_file(&csr).map_err(io_err("remove server.csr"))?;
    fs::copy(&files.cert, &files.ca_cert).map_err(io_err("copy server.crt to ca.crt"))?;
    fs::set_permissions(&files.key, fs::Permissions::from_mode(0o600))
        .map_err(io_err("chmod server.key"))?;
    Ok(files)
}
