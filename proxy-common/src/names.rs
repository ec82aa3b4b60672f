//! The `SVC_NAMES` map: what each svc id stands for, for inspection tools.

use crate::pod;

/// Longest Service port description in `SVC_NAMES`.
pub const SVC_NAME_MAX: usize = 248;

/// Value of `SVC_NAMES`: what a svc id stands for, so tools reading the
/// pinned maps (`proxy-agent service`, `bpftool map dump`) can name it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvcName {
    /// Length of `text`.
    pub len: u32,
    /// `NAMESPACE/NAME:PORT/PROTOCOL`, plus ` external` for the table of a
    /// Service port's external frontends; UTF-8, zero padded.
    pub text: [u8; SVC_NAME_MAX],
    /// Explicit padding.
    pub _pad: u32,
}

impl Default for SvcName {
    fn default() -> Self {
        Self {
            len: 0,
            text: [0; SVC_NAME_MAX],
            _pad: 0,
        }
    }
}

pod!(SvcName);

impl SvcName {
    /// The text, truncated to [`SVC_NAME_MAX`] bytes (at a character boundary).
    pub fn new(text: &str) -> Self {
        let mut n = text.len().min(SVC_NAME_MAX);
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        let mut v = Self::default();
        v.text[..n].copy_from_slice(&text.as_bytes()[..n]);
        v.len = n as u32;
        v
    }

    /// The text (empty if it is not UTF-8).
    pub fn text(&self) -> &str {
        let n = (self.len as usize).min(SVC_NAME_MAX);
        core::str::from_utf8(&self.text[..n]).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_truncate_at_characters() {
        assert_eq!(SvcName::new("ns/web:http/TCP").text(), "ns/web:http/TCP");
        let mut long = [b'a'; SVC_NAME_MAX + 3];
        long[SVC_NAME_MAX - 1] = 0xc3;
        long[SVC_NAME_MAX] = 0xa9;
        let text = core::str::from_utf8(&long).unwrap();
        let name = SvcName::new(text);
        assert_eq!(name.len as usize, SVC_NAME_MAX - 1, "é is not split");
        assert!(name.text().bytes().all(|b| b == b'a'));
    }
}
