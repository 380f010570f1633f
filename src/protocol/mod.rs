//! Message framing and the few message types the proxy decodes.
