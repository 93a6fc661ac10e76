//! Who may do what: named tokens with a role, the dashboard sessions
//! opened with them, and the audit log. Secrets are kept only as SHA-256
//! hashes (a token is 256 random bits, so a plain hash is enough: there is
//! nothing to guess from it); the node looks a presented secret up by its
//! hash. Tokens and sessions are read from the store at start and kept in
//! memory, written through on every change; when they were last used is
//! written at most once a minute each.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quetzal_api::{AuditEntry, CreateToken, CreatedToken, Role, Token};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::core::Core;
use super::error::{Fault, NodeError};
use crate::store::{AuditRecord, SessionRecord, StoreError, TokenRecord};

/// The token `quetzal up` and `quetzal token` use, made at first start.
pub const FIRST_ADMIN: &str = "admin";
/// How long a dashboard session lasts unused.
pub const SESSION_IDLE: Duration = Duration::from_secs(8 * 3600);
/// How many sessions are kept at most: past it, the one unused longest
/// goes.
pub const MAX_SESSIONS: usize = 1024;
/// How many tokens there may be.
pub const MAX_TOKENS: usize = 1000;
/// How often "last used" is written to the store, at most.
const TOUCH_EVERY_MS: i64 = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("a token named {0} exists already")]
    Exists(String),
    #[error("no token named {0}")]
    Missing(String),
    #[error(
        "invalid token name '{0}': 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
    )]
    BadName(String),
    #[error("expires_days must be 1 to 3650, not {0}")]
    BadExpiry(u32),
    #[error("there are {MAX_TOKENS} tokens already; revoke one first")]
    TooMany,
}

impl AccessError {
    pub(super) fn kind(&self) -> super::ErrorKind {
        use super::ErrorKind;
        match self {
            AccessError::Exists(_) | AccessError::TooMany => ErrorKind::Conflict,
            AccessError::Missing(_) => ErrorKind::NotFound,
            AccessError::BadName(_) | AccessError::BadExpiry(_) => ErrorKind::Invalid,
        }
    }
}

/// Why a request's credentials do not admit it (401).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error(
        "this listener needs Authorization: Bearer <token> (see `quetzal token`) or a dashboard session"
    )]
    NoCredentials,
    #[error("the token is malformed: a token is 64 hexadecimal digits")]
    Malformed,
    #[error("unknown or revoked token")]
    Unknown,
    #[error("the token {0} has expired")]
    Expired(String),
    #[error("the session has ended; log in again")]
    SessionEnded,
}

/// Who a request comes from, once admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's name (`local` on the Unix socket).
    pub who: String,
    pub role: Role,
}

impl Caller {
    /// Whoever can open the Unix socket (its file mode is the access
    /// control).
    pub fn local() -> Self {
        Caller {
            who: "local".into(),
            role: Role::Admin,
        }
    }
}

#[derive(Debug)]
struct Session {
    record: SessionRecord,
    /// When `last_used_at` was last written to the store.
    stored_at: i64,
}

/// Tokens, sessions and the audit log of one node.
#[derive(Debug)]
pub struct Access {
    core: Arc<Core>,
    /// By hash of the secret.
    tokens: Mutex<HashMap<String, TokenRecord>>,
    /// By hash of the cookie.
    sessions: Mutex<HashMap<String, Session>>,
    /// The newest audit row's id: followers wait on it.
    audit_tip: watch::Sender<i64>,
}

pub fn hash(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn well_formed(secret: &str) -> bool {
    secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit())
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Who `token` makes a caller, unless it expired by `now`.
fn admitted(token: &TokenRecord, now: i64) -> Result<Caller, Denied> {
    if token.expires_at.is_some_and(|at| at <= now) {
        return Err(Denied::Expired(token.name.clone()));
    }
    Ok(Caller {
        who: token.name.clone(),
        role: token.role,
    })
}

fn store_fault(err: StoreError) -> NodeError {
    NodeError::Fault(Fault::Store(err))
}

impl Access {
    pub(super) fn open(core: Arc<Core>) -> Result<Self, NodeError> {
        let (tokens, sessions, tip) = {
            let store = core.store();
            (
                store.tokens().map_err(store_fault)?,
                store.sessions().map_err(store_fault)?,
                store.last_audit().map_err(store_fault)?,
            )
        };
        Ok(Access {
            core,
            tokens: Mutex::new(tokens.into_iter().map(|t| (t.hash.clone(), t)).collect()),
            sessions: Mutex::new(
                sessions
                    .into_iter()
                    .map(|record| {
                        let stored_at = record.last_used_at;
                        (record.hash.clone(), Session { record, stored_at })
                    })
                    .collect(),
            ),
            audit_tip: watch::channel(tip).0,
        })
    }

    /// The first start's admin token: its secret in `DATA/token` (mode
    /// 0600, for `quetzal up` and `quetzal token` on this host), its hash
    /// in the store. A node with tokens but no such file makes none.
    pub fn ensure_first_admin(&self, data: &Path, now: i64) -> Result<(), NodeError> {
        let path = crate::token::path(data);
        let secret = if path.exists() || self.lock_tokens().is_empty() {
            crate::token::ensure(data).map_err(Fault::io(&path))?
        } else {
            return Ok(());
        };
        let hash = hash(&secret);
        if self.lock_tokens().contains_key(&hash) {
            return Ok(());
        }
        let record = TokenRecord {
            name: FIRST_ADMIN.into(),
            role: Role::Admin,
            hash: hash.clone(),
            created_at: now,
            expires_at: None,
            last_used_at: None,
        };
        self.core
            .store()
            .insert_token(&record)
            .map_err(store_fault)?;
        self.lock_tokens().insert(hash, record);
        Ok(())
    }

    fn lock_tokens(&self) -> std::sync::MutexGuard<'_, HashMap<String, TokenRecord>> {
        self.tokens
            .lock()
            .expect("never poisoned: no panics while held")
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions
            .lock()
            .expect("never poisoned: no panics while held")
    }

    /// Who a bearer token belongs to, at `now` (Unix ms).
    pub fn authenticate(&self, secret: &str, now: i64) -> Result<Caller, Denied> {
        if !well_formed(secret) {
            return Err(Denied::Malformed);
        }
        let mut tokens = self.lock_tokens();
        let token = tokens.get_mut(&hash(secret)).ok_or(Denied::Unknown)?;
        let caller = admitted(token, now)?;
        let touch = token
            .last_used_at
            .is_none_or(|at| now - at >= TOUCH_EVERY_MS);
        if touch {
            token.last_used_at = Some(now);
            drop(tokens);
            if let Err(err) = self.core.store().touch_token(&caller.who, now) {
                tracing::warn!(token = %caller.who, error = %err, "cannot record when a token was used");
            }
        }
        Ok(caller)
    }

    /// The token named `name`, if it still admits.
    fn caller_named(&self, name: &str, now: i64) -> Result<Caller, Denied> {
        let tokens = self.lock_tokens();
        let token = tokens
            .values()
            .find(|token| token.name == name)
            .ok_or(Denied::SessionEnded)?;
        admitted(token, now)
    }

    /// Who a dashboard session belongs to: its token's name and role now
    /// (a revoked token's sessions end with it). A live session counts as
    /// used now; one unused for [`SESSION_IDLE`] ends.
    pub fn session(&self, cookie: &str, now: i64) -> Result<Caller, Denied> {
        let hash = hash(cookie);
        let idle = i64::try_from(SESSION_IDLE.as_millis()).unwrap_or(i64::MAX);
        let mut sessions = self.lock_sessions();
        let Some(session) = sessions.get_mut(&hash) else {
            return Err(Denied::SessionEnded);
        };
        if now - session.record.last_used_at >= idle {
            sessions.remove(&hash);
            drop(sessions);
            if let Err(err) = self.core.store().delete_session(&hash) {
                tracing::warn!(error = %err, "cannot delete an ended session");
            }
            return Err(Denied::SessionEnded);
        }
        session.record.last_used_at = now;
        let token = session.record.token.clone();
        let store_now = now - session.stored_at >= TOUCH_EVERY_MS;
        if store_now {
            session.stored_at = now;
        }
        drop(sessions);
        if store_now && let Err(err) = self.core.store().touch_session(&hash, now) {
            tracing::warn!(error = %err, "cannot record when a session was used");
        }
        self.caller_named(&token, now)
            .map_err(|_| Denied::SessionEnded)
    }

    /// Trades a token for a new session: its cookie's secret.
    pub fn log_in(&self, secret: &str, now: i64) -> Result<(String, Caller), Denied> {
        let caller = self.authenticate(secret, now)?;
        let cookie = super::random_hex(32).map_err(|_| Denied::Unknown)?;
        let record = SessionRecord {
            hash: hash(&cookie),
            token: caller.who.clone(),
            created_at: now,
            last_used_at: now,
        };
        let mut sessions = self.lock_sessions();
        let idle = i64::try_from(SESSION_IDLE.as_millis()).unwrap_or(i64::MAX);
        let mut gone: Vec<String> = Vec::new();
        if sessions.len() >= MAX_SESSIONS {
            gone.extend(
                sessions
                    .iter()
                    .filter(|(_, s)| now - s.record.last_used_at >= idle)
                    .map(|(hash, _)| hash.clone()),
            );
            for hash in &gone {
                sessions.remove(hash);
            }
        }
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.record.last_used_at)
                .map(|(hash, _)| hash.clone())
        {
            sessions.remove(&oldest);
            gone.push(oldest);
        }
        sessions.insert(
            record.hash.clone(),
            Session {
                record: record.clone(),
                stored_at: now,
            },
        );
        drop(sessions);
        let mut store = self.core.store();
        for hash in &gone {
            if let Err(err) = store.delete_session(hash) {
                tracing::warn!(error = %err, "cannot delete an ended session");
            }
        }
        store.insert_session(&record).map_err(|_| Denied::Unknown)?;
        Ok((cookie, caller))
    }

    /// Ends a session (logout).
    pub fn log_out(&self, cookie: &str) {
        let hash = hash(cookie);
        if self.lock_sessions().remove(&hash).is_some()
            && let Err(err) = self.core.store().delete_session(&hash)
        {
            tracing::warn!(error = %err, "cannot delete a session");
        }
    }

    /// Makes a token; its secret is in the answer and nowhere else.
    pub fn create_token(&self, request: CreateToken, now: i64) -> Result<CreatedToken, NodeError> {
        if !valid_name(&request.name) {
            return Err(AccessError::BadName(request.name).into());
        }
        let expires_at = match request.expires_days {
            None => None,
            Some(days @ 1..=3650) => Some(now + i64::from(days) * 86_400_000),
            Some(days) => return Err(AccessError::BadExpiry(days).into()),
        };
        if self.lock_tokens().len() >= MAX_TOKENS {
            return Err(AccessError::TooMany.into());
        }
        let secret = super::random_hex(32)?;
        let record = TokenRecord {
            name: request.name.clone(),
            role: request.role,
            hash: hash(&secret),
            created_at: now,
            expires_at,
            last_used_at: None,
        };
        match self.core.store().insert_token(&record) {
            Ok(()) => {}
            Err(StoreError::Exists(_)) => return Err(AccessError::Exists(request.name).into()),
            Err(err) => return Err(store_fault(err)),
        }
        let token = record.to_api();
        self.lock_tokens().insert(record.hash.clone(), record);
        Ok(CreatedToken { token, secret })
    }

    pub fn tokens(&self) -> Vec<Token> {
        let mut tokens: Vec<Token> = self
            .lock_tokens()
            .values()
            .map(TokenRecord::to_api)
            .collect();
        tokens.sort_by(|a, b| a.name.cmp(&b.name));
        tokens
    }

    /// Revokes a token: it and its sessions stop working at once. The
    /// first admin token's file goes with it.
    pub fn revoke(&self, name: &str, data: &Path) -> Result<(), NodeError> {
        let deleted = self.core.store().delete_token(name).map_err(store_fault)?;
        if !deleted {
            return Err(AccessError::Missing(name.to_owned()).into());
        }
        let hash = {
            let mut tokens = self.lock_tokens();
            let hash = tokens
                .iter()
                .find(|(_, token)| token.name == name)
                .map(|(hash, _)| hash.clone());
            if let Some(hash) = &hash {
                tokens.remove(hash);
            }
            hash
        };
        self.lock_sessions()
            .retain(|_, session| session.record.token != name);
        let file = crate::token::path(data);
        if let (Some(hash_of_revoked), Ok(secret)) = (hash, std::fs::read_to_string(&file))
            && self::hash(secret.trim()) == hash_of_revoked
        {
            std::fs::remove_file(&file).map_err(Fault::io(&file))?;
        }
        Ok(())
    }

    /// Appends a row to the audit log.
    pub fn record(&self, record: &AuditRecord) {
        let written = self.core.store().audit(record);
        match written {
            Ok(id) => {
                self.audit_tip.send_replace(id);
            }
            Err(err) => {
                tracing::error!(error = %err, path = %record.path, "cannot write the audit log")
            }
        }
    }

    /// Audit rows after `after`, oldest first; with `wait`, waits that
    /// long for one when there is none yet.
    pub async fn audit(
        &self,
        after: i64,
        limit: u32,
        wait: Duration,
    ) -> Result<Vec<AuditEntry>, NodeError> {
        let mut tip = self.audit_tip.subscribe();
        let _ = tokio::time::timeout(wait, tip.wait_for(|id| *id > after)).await;
        let rows = self
            .core
            .store()
            .audit_after(after, limit)
            .map_err(store_fault)?;
        Ok(rows
            .into_iter()
            .map(|(id, row)| AuditEntry {
                id,
                at: row.at,
                who: row.who,
                source: row.source,
                method: row.method,
                path: row.path,
                status: row.status,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    fn access(dir: &tempfile::TempDir) -> Access {
        let store = SqliteStore::open(&dir.path().join("q.db")).unwrap();
        Access::open(Arc::new(Core::new(Box::new(store)))).unwrap()
    }

    fn create(access: &Access, name: &str, role: Role, days: Option<u32>) -> String {
        let request = CreateToken {
            name: name.into(),
            role,
            expires_days: days,
        };
        access.create_token(request, 1_000).unwrap().secret
    }

    #[test]
    fn a_token_admits_with_its_role_until_it_expires_or_is_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let access = access(&dir);
        let secret = create(&access, "ci", Role::Operator, Some(1));

        let caller = access.authenticate(&secret, 2_000).unwrap();
        assert_eq!(caller.who, "ci");
        assert_eq!(caller.role, Role::Operator);
        assert_eq!(
            access.authenticate(&secret, 1_000 + 86_400_000),
            Err(Denied::Expired("ci".into()))
        );
        assert_eq!(access.authenticate("abc", 2_000), Err(Denied::Malformed));
        assert_eq!(
            access.authenticate(&"0".repeat(64), 2_000),
            Err(Denied::Unknown)
        );
        access.revoke("ci", dir.path()).unwrap();
        assert_eq!(access.authenticate(&secret, 2_000), Err(Denied::Unknown));
    }

    #[test]
    fn only_the_hash_is_stored_and_a_reopened_node_knows_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let secret = create(&access(&dir), "ci", Role::Viewer, None);

        let stored = std::fs::read(dir.path().join("q.db")).unwrap();
        let again = access(&dir);

        assert!(
            !stored.windows(64).any(|w| w == secret.as_bytes()),
            "the secret is in the store"
        );
        assert_eq!(
            again.authenticate(&secret, 2_000).unwrap().role,
            Role::Viewer
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let access = access(&dir);
        create(&access, "ci", Role::Viewer, None);
        let try_create = |name: &str, days| {
            access
                .create_token(
                    CreateToken {
                        name: name.into(),
                        role: Role::Viewer,
                        expires_days: days,
                    },
                    1,
                )
                .unwrap_err()
        };

        assert!(matches!(
            try_create("ci", None),
            NodeError::Access(AccessError::Exists(_))
        ));
        assert!(matches!(
            try_create("bad name", None),
            NodeError::Access(AccessError::BadName(_))
        ));
        assert!(matches!(
            try_create("ok", Some(0)),
            NodeError::Access(AccessError::BadExpiry(0))
        ));
        assert!(matches!(
            access.revoke("nobody", dir.path()).unwrap_err(),
            NodeError::Access(AccessError::Missing(_))
        ));
    }

    #[test]
    fn a_session_outlives_a_restart_ends_when_idle_and_with_its_token() {
        let dir = tempfile::tempdir().unwrap();
        let secret = create(&access(&dir), "ops", Role::Operator, None);
        let (cookie, _) = access(&dir).log_in(&secret, 10_000).unwrap();
        let idle = i64::try_from(SESSION_IDLE.as_millis()).unwrap();

        let reopened = access(&dir);
        assert_eq!(reopened.session(&cookie, 20_000).unwrap().who, "ops");
        // Used at 20 s: it lasts a whole idle time from then.
        assert!(reopened.session(&cookie, 20_000 + idle - 1).is_ok());
        assert_eq!(
            reopened.session(&cookie, 20_000 + 3 * idle),
            Err(Denied::SessionEnded)
        );

        let (cookie, _) = reopened.log_in(&secret, 30_000).unwrap();
        reopened.revoke("ops", dir.path()).unwrap();
        assert_eq!(reopened.session(&cookie, 30_001), Err(Denied::SessionEnded));
    }

    #[test]
    fn the_sessions_kept_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let access = access(&dir);
        let secret = create(&access, "ops", Role::Operator, None);
        let mut cookies = Vec::new();
        for i in 0..=MAX_SESSIONS {
            let at = 10_000 + i64::try_from(i).unwrap();
            cookies.push(access.log_in(&secret, at).unwrap().0);
        }

        assert_eq!(access.lock_sessions().len(), MAX_SESSIONS);
        assert_eq!(
            access.session(&cookies[0], 20_000),
            Err(Denied::SessionEnded),
            "the one unused longest went"
        );
        assert!(access.session(&cookies[MAX_SESSIONS], 20_000).is_ok());
    }

    #[test]
    fn the_first_admin_token_is_made_once_and_its_file_goes_when_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let access = access(&dir);
        access.ensure_first_admin(dir.path(), 1).unwrap();
        access.ensure_first_admin(dir.path(), 2).unwrap();
        let secret = std::fs::read_to_string(crate::token::path(dir.path())).unwrap();

        assert_eq!(access.tokens().len(), 1);
        assert_eq!(access.authenticate(&secret, 3).unwrap().who, FIRST_ADMIN);
        create(&access, "other", Role::Admin, None);
        access.revoke(FIRST_ADMIN, dir.path()).unwrap();
        assert!(!crate::token::path(dir.path()).exists());
        access.ensure_first_admin(dir.path(), 4).unwrap();
        assert_eq!(access.tokens().len(), 1, "no new admin token: others exist");
    }
}
