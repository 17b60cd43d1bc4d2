//! Base64 (standard alphabet, padded) for byte payloads: the reference encodes Go `[]byte`
//! fields this way, so every SDK expects it.

use base64::Engine;

/// Encodes bytes for a wire field.
pub fn encode(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Decodes a wire field.
pub fn decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::STANDARD.decode(text.as_bytes())
}
