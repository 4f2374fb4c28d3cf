//! Users' API tokens: the digests the engine holds, and the index it publishes for the HTTP API.

use std::collections::HashMap;

use tracing::warn;

use poolkeeper_runtime::Runtime;

use crate::handle::TokenOwner;
use crate::source::UserToken;
use crate::{Engine, status};

impl<R: Runtime> Engine<R> {
    /// Reads user `name`'s token again (its `tokenSecretFile` may have changed) and sets its
    /// `TokenReady` condition. True when the token changed.
    pub(crate) fn refresh_token(&mut self, name: &str, now: u64) -> bool {
        let Some(u) = self.users.get_mut(name) else {
            return false;
        };
        let token = self.config.resolve.user_token(&u.spec, &u.origin);
        let changed = token != u.token;
        let secret = u.spec.token_secret_ref.as_ref();
        let (ready, reason, message) = match (&token, &u.spec.token_secret_file, secret) {
            (UserToken::Unreadable(why), _, Some(_)) => {
                (false, "TokenSecretUnreadable", why.clone())
            }
            (UserToken::Unreadable(why), _, None) => (false, "TokenFileUnreadable", why.clone()),
            (UserToken::Digest(_), Some(f), _) => {
                (true, "TokenFileRead", format!("token read from {f}"))
            }
            (UserToken::Digest(_), None, Some(r)) => (
                true,
                "TokenSecretRead",
                format!("token read from Secret {}, key {}", r.name, r.key),
            ),
            (UserToken::Digest(_), None, None) => {
                (true, "TokenSha256", "token digest declared".into())
            }
            (UserToken::None, ..) => {
                u.conditions.retain(|c| c.type_ != "TokenReady");
                u.token = token;
                return changed;
            }
        };
        if status::set_condition(
            &mut u.conditions,
            "TokenReady",
            ready,
            reason,
            &message,
            now,
        ) && !ready
        {
            warn!(user = name, "{message}");
            u.events.push(true, reason, message, now);
        }
        u.token = token;
        changed
    }

    /// Reads every `tokenSecretFile` and `tokenSecretRef` again (at each resync): a rotated
    /// token works from then on.
    pub(crate) fn reload_token_files(&mut self) {
        let now = self.clock.now_ms();
        let names: Vec<String> = self
            .users
            .iter()
            .filter(|(_, u)| {
                u.spec.token_secret_file.is_some() || u.spec.token_secret_ref.is_some()
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            if self.refresh_token(&name, now) {
                self.tokens_stale = true;
            }
        }
    }

    /// Rebuilds the token index the API reads, if a user changed since it was last built. A
    /// digest that two users declare authenticates neither (and says so): a token must name
    /// one user.
    pub(crate) fn publish_tokens(&mut self) {
        if !std::mem::take(&mut self.tokens_stale) {
            return;
        }
        let mut index: HashMap<[u8; 32], TokenOwner> = HashMap::new();
        let mut ambiguous = std::collections::HashSet::new();
        for (name, u) in &self.users {
            let UserToken::Digest(digest) = u.token else {
                continue;
            };
            let owner = TokenOwner {
                user: name.clone(),
                disabled: u.spec.disabled,
                admin: u.spec.admin,
            };
            if let Some(first) = index.insert(digest, owner) {
                warn!(
                    users = %format!("{}, {name}", first.user),
                    "two users declare the same token: it authenticates neither"
                );
                ambiguous.insert(digest);
            }
        }
        for d in ambiguous {
            index.remove(&d);
        }
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = index;
    }
}
