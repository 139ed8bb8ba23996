//! The only module that calls libcryptsetup (placeholder).
