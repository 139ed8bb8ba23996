//! AES-256-XTS engine (placeholder until the engine lands).
