//! When a transient KMS error is tried again. Retries live here alone: the
//! AWS SDK is set to one attempt per call (`kms/aws.rs`), so a failing KMS
//! sees `KMS_TRIES` attempts per operation, not the SDK's times ours.

use std::time::Duration;

use backon::BackoffBuilder;

/// Tries of one KMS operation.
pub(super) const KMS_TRIES: usize = 3;
/// First retry delay; it doubles per try, and each delay gets up to as much
/// again of random jitter, so replicas that lost the KMS together do not
/// retry in step.
pub(super) const KMS_BACKOFF: Duration = Duration::from_millis(50);

/// The delays between the tries of one KMS operation.
pub(super) fn kms_retry_delays() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(KMS_BACKOFF)
        .with_factor(2.0)
        .with_max_times(KMS_TRIES - 1)
        .with_jitter()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_retries_doubling_with_jitter() {
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let delays: Vec<Duration> = kms_retry_delays().collect();
            assert_eq!(delays.len(), KMS_TRIES - 1);
            assert!(
                delays[0] >= KMS_BACKOFF && delays[0] < KMS_BACKOFF * 2,
                "{delays:?}"
            );
            assert!(
                delays[1] >= KMS_BACKOFF * 2 && delays[1] < KMS_BACKOFF * 4,
                "{delays:?}"
            );
            firsts.insert(delays[0]);
        }
        assert!(firsts.len() > 1, "no jitter: {firsts:?}");
    }
}
