//! The wasm policy engine (being built).
