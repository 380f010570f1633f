//! Cell envelope, AES-256-GCM-SIV, blind index and zeroizing key types (DESIGN section 3).
