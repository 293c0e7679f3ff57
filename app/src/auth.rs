//! Who is signed in, as the app sees it (DESIGN.md §5). The server's middleware
//! authenticates the session before Leptos renders anything and puts the
//! [`CurrentUser`] into the request's extensions; server functions read it back
//! with [`current_user`] or demand an [`Admin`] with [`require_admin`], so the
//! role is checked on the server in every function, not just by hiding links.

use serde::{Deserialize, Serialize};

/// A user's role (DESIGN.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sees and changes the Token Limits tab; reads `/api/v1/spend`.
    Admin,
    /// Uses the gateway only.
    Member,
}

impl Role {
    /// `admin` or `member`, as stored and as the CLI takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }
}

/// Where a user goes once signed in (DESIGN.md §5): `next`, the page that sent
/// them to sign in, when it is a path of this site that their role may open;
/// else their start: the Token Limits tab for an administrator, the start
/// page for a member, whom an Admin Panel page would only refuse (403).
///
/// A path of this site only, never another site's: browsers drop tabs and
/// newlines from URLs and read `\` as `/`, so `/<TAB>/evil` or `/\evil`
/// would become `//evil`. Any control character, whitespace or backslash
/// refuses the path, as does a second leading slash. A page only, too: a
/// path of the server functions, the site's files, the gateway or the JSON
/// API (`MACHINE_PATHS`) would land the user on JSON or a file.
pub fn landing(next: Option<&str>, role: Role) -> String {
    let local = next.filter(|path| {
        path.starts_with('/')
            && !path.starts_with("//")
            && !path
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || c == '\\')
            && !MACHINE_PATHS.iter().any(|machine| {
                path.strip_prefix(machine)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?', '#']))
            })
            && is_plain_path(path)
    });
    let for_admins = |path: &str| {
        let page = path.split(['?', '#']).next().unwrap_or_default();
        page == "/admin" || page.starts_with("/admin/")
    };
    match (local, role) {
        (Some(path), Role::Admin) => path.to_owned(),
        (Some(path), Role::Member) if !for_admins(path) => path.to_owned(),
        (_, Role::Admin) => crate::ui::TAB.to_owned(),
        (_, Role::Member) => "/".to_owned(),
    }
}

/// Whether the path of `next` (before any `?` or `#`) has no empty segment and
/// no dot segment (`.`, `..`, also percent-encoded: `%2e`). A browser resolves
/// those before it goes: `/.//evil.example` becomes `//evil.example`, another
/// site, and `/admin/../..//evil.example` too. No page of the panel needs one.
fn is_plain_path(next: &str) -> bool {
    let path = next.split(['?', '#']).next().unwrap_or_default();
    let path = path.to_ascii_lowercase().replace("%2e", ".");
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    segments
        .iter()
        .enumerate()
        .all(|(i, segment)| match *segment {
            "." | ".." => false,
            // `/` alone, or a trailing slash (`/admin/`), is an empty last segment.
            "" => i == last,
            _ => true,
        })
}

/// The paths under which the server answers programs, not people: server
/// functions, the site's files, the gateway, the JSON API, health and
/// metrics. Never a place to land after signing in.
const MACHINE_PATHS: [&str; 6] = ["/fn", "/pkg", "/v1", "/api", "/healthz", "/metrics"];

/// A role name that is neither `admin` nor `member`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a role: use admin or member")]
pub struct UnknownRole(pub String);

impl std::str::FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        match s {
            "admin" => Ok(Role::Admin),
            "member" => Ok(Role::Member),
            other => Err(UnknownRole(other.into())),
        }
    }
}

/// The signed-in user, safe to send to the browser (no password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentUser {
    /// User id.
    pub id: i64,
    /// Login email.
    pub email: String,
    /// Admin or member.
    pub role: Role,
}

/// Proof that the caller is an administrator: admin-only services take `&Admin`,
/// so forgetting the check does not compile (STYLE.md).
#[derive(Debug, Clone)]
pub struct Admin(CurrentUser);

impl Admin {
    /// The administrator.
    pub fn user(&self) -> &CurrentUser {
        &self.0
    }
}

/// Session key under which the signed-in user's id is stored.
pub const SESSION_USER_ID: &str = "user_id";

/// Session key under which the user's session epoch at sign-in is stored
/// ([`crate::store::UserRecord::session_epoch`]); a session without one was signed
/// in before epochs existed and is signed out.
pub const SESSION_EPOCH: &str = "session_epoch";

#[cfg(feature = "ssr")]
mod server {
    use super::*;
    use crate::error::ApiError;
    use argon2::{
        password_hash::{
            rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
        },
        Argon2,
    };

    /// Shortest password `user create` accepts, in characters.
    pub const MIN_PASSWORD_CHARS: usize = 12;
    /// Longest password `user create` accepts, in characters: room for any
    /// passphrase or manager's password, not for a megabyte to hash.
    pub const MAX_PASSWORD_CHARS: usize = 1024;

    /// Why a credential operation failed.
    #[derive(Debug, thiserror::Error)]
    pub enum CredentialError {
        /// The password is shorter than [`MIN_PASSWORD_CHARS`].
        #[error("the password must have at least {MIN_PASSWORD_CHARS} characters")]
        PasswordTooShort,
        /// The password is longer than [`MAX_PASSWORD_CHARS`].
        #[error("the password must have at most {MAX_PASSWORD_CHARS} characters")]
        PasswordTooLong,
        /// Hashing failed (out of memory or a bad parameter set).
        #[error("could not hash the password: {0}")]
        Hash(String),
    }

    /// Hash `password` with argon2id and a random salt, as a PHC string.
    ///
    /// Errors: [`CredentialError::PasswordTooShort`],
    /// [`CredentialError::PasswordTooLong`], [`CredentialError::Hash`].
    pub fn hash_password(password: &str) -> Result<String, CredentialError> {
        let chars = password.chars().count();
        if chars < MIN_PASSWORD_CHARS {
            return Err(CredentialError::PasswordTooShort);
        }
        if chars > MAX_PASSWORD_CHARS {
            return Err(CredentialError::PasswordTooLong);
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

    /// The signed-in user of this request, if any.
    pub async fn current_user() -> Option<CurrentUser> {
        leptos_axum::extract::<axum::Extension<CurrentUser>>()
            .await
            .ok()
            .map(|axum::Extension(user)| user)
    }

    /// The administrator making this request.
    ///
    /// Errors: [`ApiError::Unauthorized`] when nobody is signed in,
    /// [`ApiError::Forbidden`] for a member. The HTTP status is set accordingly.
    pub async fn require_admin() -> Result<Admin, ApiError> {
        let result = match current_user().await {
            None => Err(ApiError::Unauthorized),
            Some(user) if user.role == Role::Admin => Ok(Admin(user)),
            Some(_) => Err(ApiError::Forbidden),
        };
        if let Err(e) = &result {
            set_status(e);
        }
        result
    }

    /// Whether a request with `headers` asks for HTML, as a browser's form
    /// posted without JavaScript does (its `Accept` has `text/html`): server_fn
    /// answers such a post with a redirect back to the page. The header is
    /// read as server_fn reads it, bytes that are not UTF-8 replaced (U+FFFD).
    pub fn asks_for_html(headers: &axum::http::HeaderMap) -> bool {
        headers
            .get(axum::http::header::ACCEPT)
            .is_some_and(|accept| String::from_utf8_lossy(accept.as_bytes()).contains("text/html"))
    }

    /// Whether the request being answered is a form posted without
    /// JavaScript ([`asks_for_html`]), from the server function's context.
    pub fn is_plain_form_post() -> bool {
        leptos::prelude::use_context::<axum::http::request::Parts>()
            .is_some_and(|parts| asks_for_html(&parts.headers))
    }

    /// Answer a server function's error with its real status instead of 500.
    ///
    /// A plain form post (no JavaScript) is left alone: the server-function layer
    /// redirects it back to the page with the error in the URL, and a status other
    /// than a redirect would make the browser show the raw error instead.
    pub fn set_status(e: &ApiError) {
        if is_plain_form_post() {
            return;
        }
        if let Some(response) = leptos::prelude::use_context::<leptos_axum::ResponseOptions>() {
            if let Ok(status) = axum::http::StatusCode::from_u16(e.status()) {
                response.set_status(status);
            }
        }
    }

    impl From<&Admin> for crate::store::Actor {
        fn from(admin: &Admin) -> Self {
            crate::store::Actor::User {
                id: admin.0.id,
                email: admin.0.email.clone(),
            }
        }
    }
}

#[cfg(feature = "ssr")]
pub use server::{
    asks_for_html, current_user, dummy_password_hash, hash_password, is_plain_form_post,
    require_admin, set_status, verify_password, CredentialError, MAX_PASSWORD_CHARS,
    MIN_PASSWORD_CHARS,
};

#[cfg(test)]
mod tests {
    use super::{landing, Role};

    #[test]
    fn only_local_paths_are_followed_after_sign_in() {
        let next = |p: &str| landing(Some(p), Role::Admin);
        assert_eq!(next("/admin/token-limits"), "/admin/token-limits");
        assert_eq!(next("/?a=b"), "/?a=b");
        for bad in [
            "//evil.example",
            "/\t/evil.example",
            "/\n/evil",
            "/\\evil.example",
            "https://evil.example",
            "evil",
            "/ /evil",
            "",
        ] {
            assert_eq!(next(bad), "/admin/token-limits", "{bad:?} was followed");
            assert_eq!(
                landing(Some(bad), Role::Member),
                "/",
                "{bad:?} was followed"
            );
        }
        assert_eq!(landing(None, Role::Admin), "/admin/token-limits");
    }

    /// A browser resolves dot segments and empty ones before it goes, and may
    /// end on another site: such a `next` is not followed.
    #[test]
    fn paths_with_dot_or_empty_segments_are_not_followed() {
        for bad in [
            "/.//evil.example",
            "/admin/../..//evil.example",
            "/%2e//evil.example",
            "/%2E%2e/evil",
            "/a//b",
            "/admin/./token-limits",
            "/admin/..",
        ] {
            assert_eq!(
                landing(Some(bad), Role::Admin),
                "/admin/token-limits",
                "{bad:?} was followed"
            );
        }
        for good in [
            "/",
            "/admin/",
            "/admin/token-limits?a=b//c",
            "/a.b/c..d",
            "/#x",
        ] {
            assert_eq!(landing(Some(good), Role::Admin), good);
        }
    }

    #[test]
    fn paths_that_answer_programs_are_not_landed_on() {
        for machine in [
            "/fn/logout",
            "/fn/save_model_limits?x=1",
            "/pkg/tollgate.js",
            "/v1/models",
            "/api/v1/spend",
            "/healthz",
            "/metrics#x",
        ] {
            assert_eq!(landing(Some(machine), Role::Admin), "/admin/token-limits");
            assert_eq!(landing(Some(machine), Role::Member), "/");
        }
        // Pages whose names merely begin alike are followed.
        assert_eq!(landing(Some("/apis"), Role::Member), "/apis");
        assert_eq!(landing(Some("/functions"), Role::Member), "/functions");
    }

    /// A member sent to sign in by an Admin Panel page lands on the start
    /// page, not on the panel's refusal; other pages are followed.
    #[test]
    fn members_land_on_the_start_page_rather_than_a_refusal() {
        let member = |p: &str| landing(Some(p), Role::Member);
        assert_eq!(member("/admin/token-limits"), "/");
        assert_eq!(member("/admin"), "/");
        assert_eq!(member("/admin?__err=x"), "/");
        assert_eq!(member("/?a=b"), "/?a=b");
        assert_eq!(member("/administrators-guide"), "/administrators-guide");
        assert_eq!(landing(None, Role::Member), "/");
    }
}
