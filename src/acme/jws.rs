//! The ACME account key and the JSON Web Signatures (RFC 7515, flattened) every ACME request
//! is sent in: ES256 over P-256, with the key itself (`jwk`) until the account exists and
//! its URL (`kid`) after.

use base64ct::{Base64UrlUnpadded, Encoding};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use super::AcmeError;

/// base64url without padding, as JOSE and ACME write binary values.
pub fn b64(bytes: &[u8]) -> String {
    Base64UrlUnpadded::encode_string(bytes)
}

/// The account's P-256 key.
pub struct AccountKey {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

/// Who signs a request: the key itself (new account) or the account's URL.
pub enum Signer<'a> {
    /// `jwk`: only for creating or finding the account.
    Jwk,
    /// `kid`: the account URL.
    Kid(&'a str),
}

impl AccountKey {
    /// A new key; returns it with its PKCS#8 encoding, to keep.
    pub fn generate() -> Result<(Self, Vec<u8>), AcmeError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| AcmeError::Crypto("generating the account key".into()))?;
        let key = Self::from_pkcs8(pkcs8.as_ref())?;
        Ok((key, pkcs8.as_ref().to_vec()))
    }

    /// The key kept from [`Self::generate`].
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, AcmeError> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
            .map_err(|e| AcmeError::Crypto(format!("the account key does not load: {e}")))?;
        Ok(AccountKey { pair, rng })
    }

    /// The public key as a JWK, members in the order RFC 7638 hashes them.
    pub fn jwk(&self) -> String {
        // An uncompressed P-256 point: 0x04, then x and y, 32 bytes each.
        let point = self.pair.public_key().as_ref();
        let (x, y) = point[1..].split_at(32);
        format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            b64(x),
            b64(y)
        )
    }

    /// The JWK thumbprint (RFC 7638), base64url: what key authorizations end with.
    pub fn thumbprint(&self) -> String {
        b64(ring::digest::digest(&ring::digest::SHA256, self.jwk().as_bytes()).as_ref())
    }

    /// The key authorization for a challenge `token` (RFC 8555 section 8.1).
    pub fn key_authorization(&self, token: &str) -> String {
        format!("{token}.{}", self.thumbprint())
    }

    /// The flattened JWS of `payload` (`None`: POST-as-GET, an empty payload) for `url`.
    pub fn sign(
        &self,
        signer: Signer<'_>,
        nonce: &str,
        url: &str,
        payload: Option<&serde_json::Value>,
    ) -> Result<Vec<u8>, AcmeError> {
        let mut protected = serde_json::json!({ "alg": "ES256", "nonce": nonce, "url": url });
        match signer {
            Signer::Jwk => {
                let jwk: serde_json::Value = serde_json::from_str(&self.jwk())
                    .map_err(|e| AcmeError::Crypto(e.to_string()))?;
                protected["jwk"] = jwk;
            }
            Signer::Kid(kid) => protected["kid"] = kid.into(),
        }
        let protected = b64(protected.to_string().as_bytes());
        let payload = match payload {
            Some(p) => b64(p.to_string().as_bytes()),
            None => String::new(),
        };
        let signing_input = format!("{protected}.{payload}");
        let sig = self
            .pair
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| AcmeError::Crypto("signing".into()))?;
        let jws = serde_json::json!({
            "protected": protected,
            "payload": payload,
            "signature": b64(sig.as_ref()),
        });
        Ok(jws.to_string().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    #[test]
    fn a_signature_verifies_with_the_jwk_it_names() {
        let (key, pkcs8) = AccountKey::generate().unwrap();
        let again = AccountKey::from_pkcs8(&pkcs8).unwrap();
        assert_eq!(key.thumbprint(), again.thumbprint());
        let jws = key
            .sign(
                Signer::Jwk,
                "n0nce",
                "https://a/new-acct",
                Some(&serde_json::json!({"x": 1})),
            )
            .unwrap();
        let jws: serde_json::Value = serde_json::from_slice(&jws).unwrap();
        let field = |f: &str| jws[f].as_str().unwrap().to_string();
        let protected = Base64UrlUnpadded::decode_vec(&field("protected")).unwrap();
        let protected: serde_json::Value = serde_json::from_slice(&protected).unwrap();
        assert_eq!(protected["alg"], "ES256");
        assert_eq!(protected["nonce"], "n0nce");
        assert_eq!(protected["jwk"]["kty"], "EC");
        let x = Base64UrlUnpadded::decode_vec(protected["jwk"]["x"].as_str().unwrap()).unwrap();
        let y = Base64UrlUnpadded::decode_vec(protected["jwk"]["y"].as_str().unwrap()).unwrap();
        let point = [&[4u8][..], &x, &y].concat();
        let sig = Base64UrlUnpadded::decode_vec(&field("signature")).unwrap();
        let input = format!("{}.{}", field("protected"), field("payload"));
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(input.as_bytes(), &sig)
            .expect("the signature verifies");
        let get = key
            .sign(Signer::Kid("https://a/acct/1"), "n", "https://a/o", None)
            .unwrap();
        let get: serde_json::Value = serde_json::from_slice(&get).unwrap();
        assert_eq!(get["payload"], "");
    }

    #[test]
    fn garbage_is_not_an_account_key() {
        assert!(AccountKey::from_pkcs8(b"not a key").is_err());
    }
}
