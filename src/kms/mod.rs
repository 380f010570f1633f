//! The KeyProvider trait and its providers: local keyring, AWS KMS.
