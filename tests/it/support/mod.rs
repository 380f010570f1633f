//! Harness pieces shared by the key and KMS tests: a moto server for AWS KMS
//! and a PostgreSQL cluster with the `cmk` schema.

pub mod azure_fake;
pub mod gcp_fake;
pub mod https_fake;
pub mod kms;
pub mod moto;
pub mod pg;
pub mod pykmip;
pub mod softhsm;
pub mod vault_fake;
