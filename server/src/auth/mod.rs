//! Credentials: password hashing (argon2, DESIGN.md §5) and API keys (random,
//! shown once, stored as a SHA-256 hash: a key has 256 bits of entropy, so a fast
//! hash is enough and lookups stay O(1)).

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Prefix of every Tollgate API key, so that leaked keys are recognisable.
pub const API_KEY_PREFIX: &str = "tg_";

/// Shortest password `user create` accepts, in characters.
pub const MIN_PASSWORD_CHARS: usize = 12;

/// Why a credential operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The password is shorter than [`MIN_PASSWORD_CHARS`].
    #[error("the password must have at least {MIN_PASSWORD_CHARS} characters")]
    PasswordTooShort,
    /// Hashing failed (out of memory or a bad parameter set).
    #[error("could not hash the password: {0}")]
    Hash(String),
}

/// Hash `password` with argon2id and a random salt, as a PHC string.
///
/// Errors: [`CredentialError::PasswordTooShort`], [`CredentialError::Hash`].
pub fn hash_password(password: &str) -> Result<String, CredentialError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(CredentialError::PasswordTooShort);
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| CredentialError::Hash(e.to_string()))
}

/// True when `password` matches the PHC string `hash`; a malformed hash matches
/// nothing.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash to verify against when the user does not exist, so that a login attempt
/// for an unknown email takes as long as one with a wrong password.
pub fn dummy_password_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(b"not a password of anyone", &salt)
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}

/// A new API key: `(the key, its hash)`. The key is shown once and never stored.
pub fn new_api_key() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let key = format!("{API_KEY_PREFIX}{}", hex::encode(bytes));
    let hash = hash_api_key(&key);
    (key, hash)
}

/// The stored form of an API key: SHA-256, hex.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_against_their_hash() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("correct horse batterY", &hash));
        assert!(!verify_password("anything", "not a phc string"));
        assert!(matches!(
            hash_password("short"),
            Err(CredentialError::PasswordTooShort)
        ));
    }

    #[test]
    fn api_keys_are_random_and_hashed() {
        let (a, hash_a) = new_api_key();
        let (b, _) = new_api_key();
        assert_ne!(a, b);
        assert!(a.starts_with(API_KEY_PREFIX) && a.len() == API_KEY_PREFIX.len() + 64);
        assert_eq!(hash_api_key(&a), hash_a);
        assert!(!hash_a.contains(&a[API_KEY_PREFIX.len()..]));
    }
}
