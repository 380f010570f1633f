//! cmk-proxy: a transparent PostgreSQL proxy that encrypts policy columns
//! with per-tenant, customer-managed keys.
#![forbid(unsafe_code)]

pub mod adopt;
pub mod audit;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod keys;
pub mod kms;
#[cfg(feature = "dev")]
pub mod localpg;
pub mod ops;
pub mod pg_error;
pub mod protocol;
pub mod proxy;
pub mod rewrite;
pub mod tls;
pub mod values;
