//! Every integration test of cmk-proxy, in one test binary.
//!
//! One binary rather than one per file: each links the whole proxy with its
//! AWS SDK and debug information (about 400 MB apiece), and two dozen of them
//! filled the CI machine's disk while linking. cargo-nextest still runs each
//! test in its own process.

mod common;
mod support;

mod adopt_aws;
mod adopt_decrypt;
mod adopt_encrypt;
mod adopt_reencrypt;
mod audit_delivery;
mod audit_sinks;
mod catalog_schema;
mod citus;
mod clients;
mod clients_encrypted;
mod config_errors;
mod config_flags;
mod config_upstream;
mod docs_tutorial;
mod encryption_at_rest;
mod encryption_attacks;
mod encryption_aws;
mod encryption_copy;
mod encryption_extended;
mod encryption_lineage;
mod encryption_orm_saves;
mod encryption_own_statements;
mod encryption_robustness;
mod encryption_schema_changes;
mod encryption_search;
mod encryption_simple;
mod fuzz_inputs;
mod keys_approval;
mod keys_registry;
mod kms_aws;
mod kms_azure;
mod kms_gcp;
mod kms_kmip;
mod kms_local;
mod kms_pkcs11;
mod kms_retries;
mod kms_vault;
mod migrate_schema;
mod ops_admin;
mod ops_container;
mod ops_reload;
mod passthrough_dev;
mod passthrough_localpg;
mod passthrough_logging;
mod passthrough_protocol;
mod passthrough_protocol_versions;
mod passthrough_tls_auth;
mod replicas;
mod robustness_client;
mod robustness_faults;
mod robustness_hardening;
mod robustness_load;
mod robustness_shutdown;
mod robustness_upstream;
mod soak;
mod upstream_tls;
mod values_differential;
