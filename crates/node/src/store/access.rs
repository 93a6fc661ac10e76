//! Who may use the API: named tokens (kept as hashes, never the secret),
//! the dashboard sessions opened with them (hashed too), and the audit
//! log of every mutating request.

use quetzal_api::Role;
use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, StoreError, sqlite_error};

/// A token as the node keeps it: its secret only as a SHA-256 hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    /// SHA-256 of the secret, hex.
    pub hash: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

impl TokenRecord {
    pub fn to_api(&self) -> quetzal_api::Token {
        quetzal_api::Token {
            name: self.name.clone(),
            role: self.role,
            created_at: self.created_at,
            expires_at: self.expires_at,
            last_used_at: self.last_used_at,
        }
    }
}

/// A dashboard session: the hash of its cookie and the token it was
/// opened with (its role is that token's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub hash: String,
    pub token: String,
    pub created_at: i64,
    pub last_used_at: i64,
}

/// One row of the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    pub at: i64,
    pub who: String,
    pub source: String,
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// How many audit rows the store keeps: past it, the oldest go.
pub const KEEP_AUDIT: i64 = 100_000;

pub trait AccessStore {
    /// Refused with [`StoreError::Exists`] when the name is taken.
    fn insert_token(&mut self, token: &TokenRecord) -> Result<(), StoreError>;
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Deletes a token and its sessions; false when there was none.
    fn delete_token(&mut self, name: &str) -> Result<bool, StoreError>;
    fn touch_token(&mut self, name: &str, at: i64) -> Result<(), StoreError>;

    fn insert_session(&mut self, session: &SessionRecord) -> Result<(), StoreError>;
    fn sessions(&self) -> Result<Vec<SessionRecord>, StoreError>;
    fn delete_session(&mut self, hash: &str) -> Result<(), StoreError>;
    fn touch_session(&mut self, hash: &str, at: i64) -> Result<(), StoreError>;
}

pub trait AuditStore {
    /// Appends a row (and drops the oldest past [`KEEP_AUDIT`]); its id.
    fn audit(&mut self, record: &AuditRecord) -> Result<i64, StoreError>;
    /// Rows after `after`, oldest first, at most `limit`.
    fn audit_after(&self, after: i64, limit: u32) -> Result<Vec<(i64, AuditRecord)>, StoreError>;
    /// The newest row's id (0: none).
    fn last_audit(&self) -> Result<i64, StoreError>;
}

impl AccessStore for SqliteStore {
    fn insert_token(&mut self, token: &TokenRecord) -> Result<(), StoreError> {
        let inserted = self.conn.execute(
            "INSERT INTO tokens (name, role, hash, created_at, expires_at, last_used_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
            params![
                token.name,
                token.role.as_str(),
                token.hash,
                token.created_at,
                token.expires_at,
                token.last_used_at
            ],
        );
        match inserted.map_err(|e| self.sql(e))? {
            0 => Err(StoreError::Exists(format!("token {}", token.name))),
            _ => Ok(()),
        }
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT name, role, hash, created_at, expires_at, last_used_at FROM tokens
                 ORDER BY name",
            )
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                    row.get(5)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut tokens = Vec::new();
        for row in rows {
            let (name, role, hash, created_at, expires_at, last_used_at) =
                row.map_err(|e| self.sql(e))?;
            let role = Role::parse(&role)
                .ok_or_else(|| StoreError::Corrupt(format!("token {name} has role '{role}'")))?;
            tokens.push(TokenRecord {
                name,
                role,
                hash,
                created_at,
                expires_at,
                last_used_at,
            });
        }
        Ok(tokens)
    }

    fn delete_token(&mut self, name: &str) -> Result<bool, StoreError> {
        let failed = sqlite_error(&self.path);
        let tx = self.conn.transaction().map_err(failed)?;
        let deleted = tx
            .execute("DELETE FROM sessions WHERE token = ?1", params![name])
            .and_then(|_| tx.execute("DELETE FROM tokens WHERE name = ?1", params![name]))
            .and_then(|deleted| tx.commit().map(|()| deleted));
        Ok(deleted.map_err(failed)? > 0)
    }

    fn touch_token(&mut self, name: &str, at: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE tokens SET last_used_at = ?2 WHERE name = ?1",
                params![name, at],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    fn insert_session(&mut self, session: &SessionRecord) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO sessions (hash, token, created_at, last_used_at) VALUES (?1, ?2, ?3, ?4)",
                params![
                    session.hash,
                    session.token,
                    session.created_at,
                    session.last_used_at
                ],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    fn sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let mut statement = self
            .conn
            .prepare("SELECT hash, token, created_at, last_used_at FROM sessions")
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map([], |row| {
                Ok(SessionRecord {
                    hash: row.get(0)?,
                    token: row.get(1)?,
                    created_at: row.get(2)?,
                    last_used_at: row.get(3)?,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    fn delete_session(&mut self, hash: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM sessions WHERE hash = ?1", params![hash])
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    fn touch_session(&mut self, hash: &str, at: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE sessions SET last_used_at = ?2 WHERE hash = ?1",
                params![hash, at],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }
}

impl AuditStore for SqliteStore {
    fn audit(&mut self, record: &AuditRecord) -> Result<i64, StoreError> {
        let failed = sqlite_error(&self.path);
        let tx = self.conn.transaction().map_err(failed)?;
        let id = tx
            .execute(
                "INSERT INTO audit (at, who, source, method, path, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    record.at,
                    record.who,
                    record.source,
                    record.method,
                    record.path,
                    record.status
                ],
            )
            .map(|_| tx.last_insert_rowid())
            .and_then(|id| {
                tx.execute("DELETE FROM audit WHERE id <= ?1", params![id - KEEP_AUDIT])
                    .map(|_| id)
            })
            .and_then(|id| tx.commit().map(|()| id));
        id.map_err(failed)
    }

    fn audit_after(&self, after: i64, limit: u32) -> Result<Vec<(i64, AuditRecord)>, StoreError> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT id, at, who, source, method, path, status FROM audit
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(|e| self.sql(e))?;
        let rows = statement
            .query_map(params![after, limit], |row| {
                Ok((
                    row.get(0)?,
                    AuditRecord {
                        at: row.get(1)?,
                        who: row.get(2)?,
                        source: row.get(3)?,
                        method: row.get(4)?,
                        path: row.get(5)?,
                        status: row.get(6)?,
                    },
                ))
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    fn last_audit(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT MAX(id) FROM audit", [], |row| {
                row.get::<_, Option<i64>>(0)
            })
            .optional()
            .map(|id| id.flatten().unwrap_or(0))
            .map_err(|e| self.sql(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::open;

    fn token(name: &str, role: Role) -> TokenRecord {
        TokenRecord {
            name: name.into(),
            role,
            hash: format!("hash-of-{name}"),
            created_at: 1,
            expires_at: None,
            last_used_at: None,
        }
    }

    #[test]
    fn tokens_are_unique_by_name_and_take_their_sessions_when_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        store.insert_token(&token("ci", Role::Operator)).unwrap();
        store
            .insert_session(&SessionRecord {
                hash: "s".into(),
                token: "ci".into(),
                created_at: 1,
                last_used_at: 1,
            })
            .unwrap();

        let again = store.insert_token(&token("ci", Role::Admin));
        assert!(matches!(again, Err(StoreError::Exists(_))), "{again:?}");
        assert_eq!(store.tokens().unwrap(), vec![token("ci", Role::Operator)]);

        assert!(store.delete_token("ci").unwrap());
        assert!(!store.delete_token("ci").unwrap());
        assert_eq!(store.sessions().unwrap(), vec![]);
    }

    #[test]
    fn the_audit_log_reads_on_from_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        let row = |path: &str| AuditRecord {
            at: 1,
            who: "ci".into(),
            source: "127.0.0.1".into(),
            method: "POST".into(),
            path: path.into(),
            status: 201,
        };
        let first = store.audit(&row("/a")).unwrap();
        let second = store.audit(&row("/b")).unwrap();

        assert_eq!(store.last_audit().unwrap(), second);
        let after = store.audit_after(first, 10).unwrap();
        assert_eq!(after, vec![(second, row("/b"))]);
        assert_eq!(store.audit_after(0, 1).unwrap().len(), 1);
    }
}
