//! Credential values and where they come from.
//!
//! `Secret` is the only type that holds a credential in memory. It never
//! prints its value, zeroizes on drop, and is read only through
//! [`Secret::expose`], so `grep 'expose('` lists every place a value is used.

pub mod oauth2;
pub mod process;
pub mod source;
pub mod store;
pub mod vault;

use std::fmt;

use zeroize::Zeroizing;

/// A credential value. `Debug` prints `Secret(***)`; there is no `Display` or `Serialize`.
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The only way to read the value.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = Secret::new("sk-live-123".into());
        assert_eq!(format!("{secret:?}"), "Secret(***)");
        assert_eq!(format!("{:?}", Some(&secret)), "Some(Secret(***))");
    }
}
