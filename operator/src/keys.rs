//! API keys of agents and generators: `brokkr_<prefix>_<secret>`. The prefix is public
//! and finds the row; only the SHA-256 of the whole key is stored.

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX_LEN: usize = 12;
const SECRET_LEN: usize = 40;

/// A freshly issued key. The plain key goes into a Secret and nowhere else.
pub struct IssuedKey {
    pub key: String,
    pub prefix: String,
    pub hash: String,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key itself.
        f.debug_struct("IssuedKey")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

pub fn issue_key() -> IssuedKey {
    let mut rng = rand::rng();
    let mut token = |len| -> String {
        (&mut rng)
            .sample_iter(Alphanumeric)
            .take(len)
            .map(|c| char::from(c).to_ascii_lowercase())
            .collect()
    };
    let prefix = token(PREFIX_LEN);
    let secret = token(SECRET_LEN);
    let key = format!("brokkr_{prefix}_{secret}");
    let hash = hash_key(&key);
    IssuedKey { key, prefix, hash }
}

/// What a key may call. A key's scopes are stored space-separated (`agent`, `generator`),
/// as OAuth writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The agent API (`/api/v1/agent/*`).
    Agent,
    /// The generator API.
    Generator,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Agent => "agent",
            Scope::Generator => "generator",
        }
    }

    /// Whether the space-separated `scopes` include this one.
    pub fn is_in(self, scopes: &str) -> bool {
        scopes.split_ascii_whitespace().any(|s| s == self.as_str())
    }
}

/// Hex SHA-256 of a whole key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The public prefix of a well-formed key.
pub fn key_prefix(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("brokkr_")?;
    let (prefix, secret) = rest.split_once('_')?;
    let well_formed = !prefix.is_empty()
        && !secret.is_empty()
        && prefix.len() <= 32
        && prefix.bytes().all(|b| b.is_ascii_alphanumeric())
        && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    well_formed.then_some(prefix)
}

/// Whether `key` hashes to `stored_hash`, compared in constant time.
pub fn key_matches(key: &str, stored_hash: &str) -> bool {
    let presented = hash_key(key);
    presented.as_bytes().ct_eq(stored_hash.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_keys_have_the_documented_shape_and_verify() {
        let issued = issue_key();
        assert!(issued.key.starts_with("brokkr_"));
        assert_eq!(key_prefix(&issued.key), Some(issued.prefix.as_str()));
        assert!(key_matches(&issued.key, &issued.hash));
        assert!(!key_matches(&format!("{}x", issued.key), &issued.hash));
        assert_ne!(issue_key().key, issued.key, "keys are random");
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let issued = issue_key();
        let printed = format!("{issued:?}");
        assert!(!printed.contains(&issued.key));
        assert!(printed.contains(&issued.prefix));
    }

    #[test]
    fn scopes_are_matched_word_by_word() {
        assert!(Scope::Agent.is_in("agent"));
        assert!(Scope::Generator.is_in("agent generator"));
        assert!(!Scope::Generator.is_in("agent"));
        assert!(!Scope::Agent.is_in("agents"));
        assert!(!Scope::Agent.is_in(""));
    }

    #[test]
    fn malformed_keys_have_no_prefix() {
        for bad in [
            "",
            "brokkr_",
            "brokkr__x",
            "brokkr_abc_",
            "other_abc_def",
            "brokkr_a-b_c",
            "brokkr_abc",
        ] {
            assert_eq!(key_prefix(bad), None, "{bad:?}");
        }
    }
}
