//! Block-device probing and safety checks (placeholder).
