//! KMS retries happen in one place (issue 17): the AWS SDK makes one
//! attempt per call and the key service retries transient errors on its
//! own schedule, with jitter, so a failing KMS sees at most three attempts
//! per operation, not the SDK's attempts times the service's.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cmk_proxy::kms::{AwsKmsProvider, KeyProvider, KmsError};

/// A TCP endpoint that accepts connections and closes them at once,
/// counting them: a KMS that fails every attempt with a transient error.
async fn closing_endpoint() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (url, accepted)
}

#[tokio::test]
async fn aws_sdk_makes_one_attempt_per_call() {
    let (url, accepted) = closing_endpoint().await;
    let provider =
        AwsKmsProvider::with_static_credentials(Some("eu-west-1"), Some(&url), "AKID", "SECRET")
            .await
            .unwrap();
    let err = provider.check_key("alias/tenant").await.unwrap_err();
    assert!(matches!(err, KmsError::Transient { .. }), "{err:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "attempts by the SDK");
}
