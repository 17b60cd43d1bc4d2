//! Raw DNS header and question-section helpers for messages the resolver relays unparsed.
//!
//! # Design
//! A forwarded reply is checked on its raw bytes (ID, QR, opcode, one question equal to the
//! one sent) and relayed as it came, so records `simple-dns` cannot decode still reach the
//! guest. Only the fixed header and the question are read: no compression pointer is
//! followed (a question name is the first name in a message, so a pointer there is
//! malformed), every index is bounds-checked.
//!
//! # Limitations
//! Nothing past the question section is validated: the records are the upstream server's
//! business, and the guest's resolver parses them.

/// Length of the fixed DNS header.
pub const HEADER_LEN: usize = 12;
/// QR: the message is a response.
const FLAG_QR: u8 = 0x80;
/// TC: the message was truncated.
const FLAG_TC: u8 = 0x02;
/// Opcode bits in the third header byte.
const OPCODE_MASK: u8 = 0x78;
/// Longest name on the wire (RFC 1035).
const MAX_WIRE_NAME: usize = 255;
/// Longest label (RFC 1035).
const MAX_LABEL: usize = 63;

/// The message ID, if there is a header.
pub fn id(msg: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.first()?, *msg.get(1)?]))
}

/// Replaces the message ID in place; false if `msg` has no header.
pub fn set_id(msg: &mut [u8], id: u16) -> bool {
    match msg.get_mut(..2) {
        Some(head) => {
            head.copy_from_slice(&id.to_be_bytes());
            true
        }
        None => false,
    }
}

/// Whether the TC bit is set (false without a header).
pub fn truncated(msg: &[u8]) -> bool {
    msg.get(2).is_some_and(|b| b & FLAG_TC != 0)
}

/// The header's 4-bit RCODE (the EDNS extension bits are not included).
pub fn rcode(msg: &[u8]) -> Option<u8> {
    msg.get(3).map(|b| b & 0x0f)
}

/// The question section of a message holding exactly one question: the wire name (no
/// compression) plus QTYPE and QCLASS. `None` if the message is malformed or has another
/// question count.
pub fn question(msg: &[u8]) -> Option<&[u8]> {
    let qdcount = u16::from_be_bytes([*msg.get(4)?, *msg.get(5)?]);
    if qdcount != 1 {
        return None;
    }
    let mut at = HEADER_LEN;
    loop {
        let len = usize::from(*msg.get(at)?);
        if len > MAX_LABEL {
            return None; // a compression pointer or a reserved label type
        }
        at += 1 + len;
        if at - HEADER_LEN > MAX_WIRE_NAME {
            return None;
        }
        if len == 0 {
            break;
        }
    }
    msg.get(HEADER_LEN..at + 4)
}

/// Whether `reply` answers the query `sent`: same ID, QR set, same opcode, and the same
/// single question (names compared ASCII case-insensitively, as DNS does).
pub fn answers(sent: &[u8], reply: &[u8]) -> bool {
    let (Some(sent_q), Some(reply_q)) = (question(sent), question(reply)) else {
        return false;
    };
    let (Some(&sent_flags), Some(&reply_flags)) = (sent.get(2), reply.get(2)) else {
        return false;
    };
    id(sent) == id(reply)
        && reply_flags & FLAG_QR != 0
        && sent_flags & OPCODE_MASK == reply_flags & OPCODE_MASK
        && sent_q.eq_ignore_ascii_case(reply_q)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message with `id`, `flags` (third header byte) and one question for `name`, type A.
    fn msg(id: u16, flags: u8, name: &[&str]) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend_from_slice(&[flags, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name {
            m.push(u8::try_from(label.len()).expect("short label"));
            m.extend_from_slice(label.as_bytes());
        }
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        m
    }

    #[test]
    fn question_section_is_found_and_bounded() {
        let m = msg(7, 0x01, &["api", "example", "com"]);
        assert_eq!(question(&m), Some(&m[HEADER_LEN..]));
        // Cut anywhere inside the question: malformed.
        for cut in HEADER_LEN..m.len() {
            assert_eq!(question(&m[..cut]), None, "cut at {cut}");
        }
        // A compression pointer in the question name.
        let mut p = m.clone();
        p[HEADER_LEN] = 0xc0;
        assert_eq!(question(&p), None);
        // Two questions.
        let mut two = m.clone();
        two[5] = 2;
        assert_eq!(question(&two), None);
        // A name longer than 255 bytes on the wire.
        let long: Vec<String> = (0..5).map(|_| "a".repeat(63)).collect();
        let long: Vec<&str> = long.iter().map(String::as_str).collect();
        assert_eq!(question(&msg(1, 0, &long)), None);
        assert_eq!(question(b""), None);
    }

    #[test]
    fn replies_must_match_id_flags_and_question() {
        let sent = msg(0x1234, 0x01, &["api", "example", "com"]);
        let good = msg(0x1234, 0x81, &["API", "example", "com"]);
        assert!(answers(&sent, &good));
        assert!(!answers(
            &sent,
            &msg(0x1235, 0x81, &["api", "example", "com"])
        ));
        assert!(!answers(
            &sent,
            &msg(0x1234, 0x01, &["api", "example", "com"])
        ));
        assert!(!answers(
            &sent,
            &msg(0x1234, 0x81, &["www", "example", "com"])
        ));
        assert!(!answers(
            &sent,
            &msg(0x1234, 0x81 | 0x10, &["api", "example", "com"])
        ));
        let mut other_type = good.clone();
        let n = other_type.len();
        other_type[n - 3] = 16;
        assert!(!answers(&sent, &other_type));
        assert!(!answers(&sent, &good[..5]));
    }

    #[test]
    fn header_fields() {
        let mut m = msg(0xabcd, 0x83, &["a"]);
        m[3] = 0x83;
        assert_eq!(id(&m), Some(0xabcd));
        assert!(truncated(&m));
        assert_eq!(rcode(&m), Some(3));
        assert!(set_id(&mut m, 9));
        assert_eq!(id(&m), Some(9));
        assert!(!set_id(&mut [0u8], 1));
        assert_eq!(id(&[1]), None);
        assert!(!truncated(&[]));
    }
}
