//! A KMIP client over TLS with a client certificate: one request message
//! with one batch item per call, on pooled connections. Knows the message
//! envelope and the transport; the provider decides what the answers mean.

use rustls::pki_types::pem::PemObject;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::ttlv::{message_len, Item, Tag, Value};
use crate::kms::KmsError;

/// KMIP tags this client and the provider use (KMIP 1.4, section 9.1.3.1).
pub mod tag {
    use super::Tag;
    pub const ATTRIBUTE: Tag = 0x420008;
    pub const ATTRIBUTE_NAME: Tag = 0x42000A;
    pub const ATTRIBUTE_VALUE: Tag = 0x42000B;
    pub const BATCH_COUNT: Tag = 0x42000D;
    pub const BATCH_ITEM: Tag = 0x42000F;
    pub const BLOCK_CIPHER_MODE: Tag = 0x420011;
    pub const CRYPTOGRAPHIC_ALGORITHM: Tag = 0x420028;
    pub const CRYPTOGRAPHIC_PARAMETERS: Tag = 0x42002B;
    pub const IV_COUNTER_NONCE: Tag = 0x42003D;
    pub const OPERATION: Tag = 0x42005C;
    pub const PROTOCOL_VERSION: Tag = 0x420069;
    pub const PROTOCOL_VERSION_MAJOR: Tag = 0x42006A;
    pub const PROTOCOL_VERSION_MINOR: Tag = 0x42006B;
    pub const REQUEST_HEADER: Tag = 0x420077;
    pub const REQUEST_MESSAGE: Tag = 0x420078;
    pub const REQUEST_PAYLOAD: Tag = 0x420079;
    pub const RESPONSE_PAYLOAD: Tag = 0x42007C;
    pub const RESULT_MESSAGE: Tag = 0x42007D;
    pub const RESULT_REASON: Tag = 0x42007E;
    pub const RESULT_STATUS: Tag = 0x42007F;
    pub const STATE: Tag = 0x42008D;
    pub const UNIQUE_IDENTIFIER: Tag = 0x420094;
    pub const DATA: Tag = 0x4200C2;
    pub const TAG_LENGTH: Tag = 0x4200CE;
    pub const AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA: Tag = 0x4200FE;
    pub const AUTHENTICATED_ENCRYPTION_TAG: Tag = 0x4200FF;
}

/// KMIP operations the provider calls.
pub mod operation {
    pub const GET_ATTRIBUTES: u32 = 0x0B;
    pub const ENCRYPT: u32 = 0x1F;
    pub const DECRYPT: u32 = 0x20;
}

/// Protocol version sent: 1.4 is the first with Authenticated Encryption
/// Additional Data, which binds the tenant and DEK id.
const PROTOCOL: (i32, i32) = (1, 4);
/// Deadline of one call: connect, handshake, request and response.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response accepted (a KMIP answer here is a few hundred bytes).
const MAX_RESPONSE: usize = 1 << 20;
/// Connections open at most at once.
const MAX_CONNECTIONS: usize = 8;
/// Result Status "Success".
const SUCCESS: u32 = 0;

/// Where the KMIP server is and how to prove who we are.
#[derive(Debug, Clone)]
pub struct KmipSettings {
    /// `host:port` of the server.
    pub endpoint: String,
    /// CA certificate(s) (PEM) the server's certificate must chain to.
    pub ca: PathBuf,
    /// The proxy's client certificate (PEM).
    pub client_cert: PathBuf,
    /// Its private key (PEM).
    pub client_key: PathBuf,
    /// Name to verify in the server's certificate (default: the endpoint's host).
    pub server_name: Option<String>,
}

/// A failed batch item: the server's Result Reason and Result Message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Result Reason enumeration (0 when absent).
    pub reason: u32,
    /// Result Message text.
    pub message: String,
}

/// What the server answered to one operation.
pub type Answer = Result<Item, Refusal>;

/// A pooled KMIP client.
pub struct KmipClient {
    tls: TlsConnector,
    endpoint: String,
    name: ServerName<'static>,
    idle: Mutex<Vec<TlsStream<TcpStream>>>,
    permits: Semaphore,
}

impl std::fmt::Debug for KmipClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmipClient")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

fn read_pem(what: &str, path: &Path) -> Result<Vec<u8>, KmsError> {
    std::fs::read(path)
        .map_err(|e| KmsError::Config(format!("kmip {what} {}: {e}", path.display())))
}

fn certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, KmsError> {
    let pem = read_pem(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| KmsError::Config(format!("kmip {what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(KmsError::Config(format!(
            "kmip {what} {}: no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

impl KmipClient {
    /// Loads the CA and the client identity; connects lazily.
    pub fn new(settings: &KmipSettings) -> Result<KmipClient, KmsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs("ca", &settings.ca)? {
            roots
                .add(cert)
                .map_err(|e| KmsError::Config(format!("kmip ca: {e}")))?;
        }
        let chain = certs("client_cert", &settings.client_cert)?;
        let key_pem = zeroize::Zeroizing::new(read_pem("client_key", &settings.client_key)?);
        let key: PrivateKeyDer<'static> = PrivateKeyDer::from_pem_slice(key_pem.as_slice())
            .ok()
            .ok_or_else(|| {
                KmsError::Config(format!(
                    "kmip client_key {}: no private key",
                    settings.client_key.display()
                ))
            })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| KmsError::Config(format!("kmip tls: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| KmsError::Config(format!("kmip client certificate: {e}")))?;
        let host = match &settings.server_name {
            Some(name) => name.clone(),
            None => settings
                .endpoint
                .rsplit_once(':')
                .map(|(host, _)| host.trim_matches(['[', ']']).to_owned())
                .ok_or_else(|| {
                    KmsError::Config(format!(
                        "kmip endpoint '{}' is not host:port",
                        settings.endpoint
                    ))
                })?,
        };
        let name = ServerName::try_from(host.clone())
            .map_err(|_| KmsError::Config(format!("kmip server name '{host}' is invalid")))?;
        Ok(KmipClient {
            tls: TlsConnector::from(Arc::new(config)),
            endpoint: settings.endpoint.clone(),
            name,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(MAX_CONNECTIONS),
        })
    }

    /// Sends one operation with `payload` and returns the response payload
    /// or the server's refusal. Transport trouble is `Transient`.
    pub async fn call(
        &self,
        key_ref: &str,
        operation: u32,
        payload: Vec<Item>,
    ) -> Result<Answer, KmsError> {
        let transient = |detail: String| KmsError::Transient {
            key_ref: key_ref.to_owned(),
            detail: format!("kmip {}: {detail}", self.endpoint),
        };
        let request = request_message(operation, payload);
        let work = async {
            let _permit = self
                .permits
                .acquire()
                .await
                .map_err(|_| transient("client closed".to_owned()))?;
            let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
            // A pooled connection the server has since closed gets one
            // retry on a fresh connection.
            if let Some(mut conn) = pooled {
                if let Ok(response) = exchange(&mut conn, &request).await {
                    self.give_back(conn);
                    return Ok(response);
                }
            }
            let tcp = TcpStream::connect(&self.endpoint)
                .await
                .map_err(|e| transient(format!("connect: {e}")))?;
            let _ = tcp.set_nodelay(true);
            let mut conn = self
                .tls
                .connect(self.name.clone(), tcp)
                .await
                .map_err(|e| transient(format!("TLS: {e}")))?;
            let response = exchange(&mut conn, &request)
                .await
                .map_err(|e| transient(e.to_string()))?;
            self.give_back(conn);
            Ok(response)
        };
        let response = tokio::time::timeout(CALL_TIMEOUT, work)
            .await
            .map_err(|_| transient("no answer in time".to_owned()))??;
        parse_response(&response).map_err(transient)
    }

    fn give_back(&self, conn: TlsStream<TcpStream>) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
    }
}

fn request_message(operation: u32, payload: Vec<Item>) -> Vec<u8> {
    let message = Item::structure(
        tag::REQUEST_MESSAGE,
        vec![
            Item::structure(
                tag::REQUEST_HEADER,
                vec![
                    Item::structure(
                        tag::PROTOCOL_VERSION,
                        vec![
                            Item::new(tag::PROTOCOL_VERSION_MAJOR, Value::Integer(PROTOCOL.0)),
                            Item::new(tag::PROTOCOL_VERSION_MINOR, Value::Integer(PROTOCOL.1)),
                        ],
                    ),
                    Item::new(tag::BATCH_COUNT, Value::Integer(1)),
                ],
            ),
            Item::structure(
                tag::BATCH_ITEM,
                vec![
                    Item::new(tag::OPERATION, Value::Enumeration(operation)),
                    Item::structure(tag::REQUEST_PAYLOAD, payload),
                ],
            ),
        ],
    );
    let mut out = Vec::new();
    message.encode(&mut out);
    out
}

async fn exchange(conn: &mut TlsStream<TcpStream>, request: &[u8]) -> std::io::Result<Vec<u8>> {
    conn.write_all(request).await?;
    conn.flush().await?;
    let mut header = [0u8; 8];
    conn.read_exact(&mut header).await?;
    let total = message_len(&header);
    if total > MAX_RESPONSE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("response of {total} bytes"),
        ));
    }
    let mut message = vec![0u8; total];
    message[..8].copy_from_slice(&header);
    conn.read_exact(&mut message[8..]).await?;
    Ok(message)
}

/// The single batch item's payload, or its Result Reason and Message.
fn parse_response(bytes: &[u8]) -> Result<Answer, String> {
    let message = Item::decode(bytes).map_err(|e| format!("bad response: {e}"))?;
    let item = message
        .child(tag::BATCH_ITEM)
        .ok_or("response without a batch item")?;
    let status = item
        .enumeration(tag::RESULT_STATUS)
        .ok_or("batch item without a result status")?;
    if status == SUCCESS {
        let payload = item
            .child(tag::RESPONSE_PAYLOAD)
            .cloned()
            .unwrap_or_else(|| Item::structure(tag::RESPONSE_PAYLOAD, Vec::new()));
        return Ok(Ok(payload));
    }
    Ok(Err(Refusal {
        reason: item.enumeration(tag::RESULT_REASON).unwrap_or(0),
        message: item.text(tag::RESULT_MESSAGE).unwrap_or("").to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(items: Vec<Item>) -> Vec<u8> {
        let mut out = Vec::new();
        Item::structure(
            0x42007B,
            vec![
                Item::structure(0x42007A, vec![]),
                Item::structure(tag::BATCH_ITEM, items),
            ],
        )
        .encode(&mut out);
        out
    }

    #[test]
    fn request_carries_version_operation_and_payload() {
        let bytes = request_message(
            operation::GET_ATTRIBUTES,
            vec![Item::new(tag::UNIQUE_IDENTIFIER, Value::Text("1".into()))],
        );
        let message = Item::decode(&bytes).unwrap();
        let header = message.child(tag::REQUEST_HEADER).unwrap();
        let version = header.child(tag::PROTOCOL_VERSION).unwrap();
        assert_eq!(
            version.child(tag::PROTOCOL_VERSION_MINOR).unwrap().value,
            Value::Integer(4)
        );
        let batch = message.child(tag::BATCH_ITEM).unwrap();
        assert_eq!(batch.enumeration(tag::OPERATION), Some(0x0B));
        let payload = batch.child(tag::REQUEST_PAYLOAD).unwrap();
        assert_eq!(payload.text(tag::UNIQUE_IDENTIFIER), Some("1"));
    }

    #[test]
    fn responses_parse_into_payload_or_refusal() {
        let ok = response(vec![
            Item::new(tag::RESULT_STATUS, Value::Enumeration(0)),
            Item::structure(
                tag::RESPONSE_PAYLOAD,
                vec![Item::new(tag::DATA, Value::Bytes(vec![7]))],
            ),
        ]);
        let payload = parse_response(&ok).unwrap().unwrap();
        assert_eq!(payload.bytes(tag::DATA), Some(&[7u8][..]));
        let refused = response(vec![
            Item::new(tag::RESULT_STATUS, Value::Enumeration(1)),
            Item::new(tag::RESULT_REASON, Value::Enumeration(0x0C)),
            Item::new(tag::RESULT_MESSAGE, Value::Text("no".into())),
        ]);
        assert_eq!(
            parse_response(&refused).unwrap(),
            Err(Refusal {
                reason: 0x0C,
                message: "no".into()
            })
        );
        assert!(parse_response(&response(vec![])).is_err());
        assert!(parse_response(&ok[..ok.len() - 8]).is_err());
    }
}
