//! DEK registry, approval cache and rotation (DESIGN section 2).
