//! A small multi-tenant service: one OAuth grant per user, kept valid by a
//! [`TokenManager`] and its sweeper, behind an axum HTTP API.
//!
//! ```sh
//! cargo run --example multi_tenant --features manager,postgres,consent
//! ```
//!
//! It talks to the built-in provider simulator (Autodesk's dialect; its authorization
//! endpoint consents at once), so no credentials are needed: for Autodesk itself, use
//! `ProviderProfile::autodesk()` and the app's `ClientCredentials` instead, and register
//! `http://127.0.0.1:PORT/callback` as its callback URL. The grants live in a `FileStore`
//! in a temporary directory, or in PostgreSQL with `DATABASE_URL=postgresql://...` (the
//! table is created or upgraded at start). `PORT` defaults to 3000.
//!
//! - `POST /users/{id}/connect` starts a consent and answers the authorization URL; the
//!   provider sends the browser back to `GET /callback`, which stores the user's grant.
//! - `GET /users/{id}/token`: a valid access token (404: no grant; 401: the user must
//!   consent again; 503 with `Retry-After`: try again later, nothing is lost).
//! - `DELETE /users/{id}` revokes the grant, at the provider and in the store.
//! - `GET /health`: the manager's status and how many users must consent again.
//!
//! The routes trust the `{id}` they are given: a real service authenticates its users.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use time::format_description::well_known::Rfc3339;
use tokenkeeper::consent::{Consent, PasteConsent};
use tokenkeeper::store::postgres::PostgresStore;
use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{ClientCredentials, Error, EventKind, FileStore, ProviderProfile};
use tokenkeeper::{
    ReauthorizationReason, RefreshingTokenSource, SweepOptions, TokenManager, TokenStore,
};
use tokio::sync::broadcast::{Receiver, error::RecvError};
use url::Url;

/// How long a started consent waits for its redirect.
const CONSENT_TTL: Duration = Duration::from_secs(600);

#[derive(Clone)]
struct App {
    manager: TokenManager,
    profile: ProviderProfile,
    credentials: ClientCredentials,
    callback: Url,
    /// Consents waiting for their redirect, by `state`.
    pending: Arc<Mutex<HashMap<String, Pending>>>,
    /// Users whose grant died, until they consent again.
    needs_consent: Arc<Mutex<HashSet<String>>>,
}

/// A consent waiting for its redirect: whose, and since when.
type Pending = (String, PasteConsent, Instant);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_target(false).init();
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let port = env("PORT").map_or(Ok(3000), |p| p.parse())?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let base = format!("http://{}", listener.local_addr()?);

    let simulator = Simulator::builder(Mode::Autodesk).start().await?;
    let (profile, credentials) = (simulator.profile(), simulator.credentials());
    // The simulator's grants die with it: files in a temporary directory will do.
    let temp = tempfile::tempdir()?;
    let store: Arc<dyn TokenStore> = match env("DATABASE_URL") {
        Some(url) => {
            let store = PostgresStore::connect(&url).await?;
            store.create_schema().await?; // creates or upgrades the table
            Arc::new(store)
        }
        None => Arc::new(FileStore::new(temp.path())),
    };

    let manager = TokenManager::builder(profile.clone(), credentials.clone())
        .shared_store(Arc::clone(&store))
        .build()?;
    let _sweeper = manager.spawn_sweeper(SweepOptions::default());
    let needs_consent = Arc::default();
    let (events, watched) = (manager.subscribe(), Arc::clone(&store));
    tokio::spawn(track_consent(events, watched, Arc::clone(&needs_consent)));
    let app = App {
        manager,
        profile,
        credentials,
        callback: Url::parse(&format!("{base}/callback"))?,
        pending: Arc::default(),
        needs_consent,
    };
    let router = Router::new()
        .route("/users/{id}/connect", post(connect))
        .route("/callback", get(callback))
        .route("/users/{id}/token", get(token))
        .route("/users/{id}", axum::routing::delete(revoke))
        .route("/health", get(health))
        .with_state(app);

    let provider = simulator.base_url();
    println!(
        "Serving {base} (Autodesk simulated at {provider}; {store:?}). Try:

  curl -s -X POST {base}/users/alice/connect    # {{\"authorization_url\": ...}}
  curl -sL 'AUTHORIZATION_URL'    # the simulator consents and redirects to /callback
  curl -s {base}/users/alice/token
  curl -sL \"$(curl -s -X POST {base}/users/bob/connect | jq -r .authorization_url)\"
  curl -s -X DELETE {base}/users/bob; curl -s {base}/users/bob/token
  curl -s {base}/health

Stop with Ctrl-C."
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// Keeps the set of users who must consent again from the manager's events. A user with
/// nothing stored never consented: not counted.
async fn track_consent(
    mut events: Receiver<tokenkeeper::Event>,
    store: Arc<dyn TokenStore>,
    needs_consent: Arc<Mutex<HashSet<String>>>,
) {
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            // Fell behind: the events missed are lost, the next ones still count.
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        };
        match event.kind {
            EventKind::NeedsConsent => {
                if let Ok(Some(_)) = store.load(&event.key).await {
                    lock(&needs_consent).insert(event.key);
                }
            }
            EventKind::Refreshed | EventKind::Adopted | EventKind::Recovered => {
                lock(&needs_consent).remove(&event.key);
            }
            _ => {}
        }
    }
}

async fn connect(State(app): State<App>, Path(user): Path<String>) -> Result<Json<Value>, Problem> {
    source(&app, &user)?; // an id the store cannot hold is refused before any consent
    let consent = Consent::authorization_code(app.profile.clone(), app.credentials.clone())
        .and_then(|consent| consent.redirect_uri(app.callback.clone()).paste())
        .map_err(|e| failure(&user, e))?;
    let url = consent.url().clone();
    let state = url
        .query_pairs()
        .find_map(|(k, v)| (k == "state").then(|| v.into_owned()));
    let state = state.ok_or_else(|| problem(StatusCode::INTERNAL_SERVER_ERROR, "no state"))?;
    let mut pending = lock(&app.pending);
    pending.retain(|_, (.., started)| started.elapsed() < CONSENT_TTL);
    pending.insert(state, (user, consent, Instant::now()));
    Ok(Json(
        json!({ "authorization_url": url, "expires_in": CONSENT_TTL.as_secs() }),
    ))
}

/// The provider's redirect: finishes the consent its `state` names and saves the grant.
async fn callback(State(app): State<App>, RawQuery(query): RawQuery) -> Result<String, Problem> {
    let query = query.unwrap_or_default();
    let state = url::form_urlencoded::parse(query.as_bytes()).find(|(name, _)| name == "state");
    let pending = state.and_then(|(_, state)| lock(&app.pending).remove(&*state));
    let Some((user, consent, _)) = pending.filter(|(.., started)| started.elapsed() < CONSENT_TTL)
    else {
        let text = "unknown or expired consent: POST /users/{id}/connect again";
        return Err(problem(StatusCode::BAD_REQUEST, text));
    };
    // The whole redirect URL: `finish` checks its state and exchanges its code once.
    let fail = |e: Error| failure(&user, e);
    let grant = consent.finish(&format!("{}?{query}", app.callback)).await;
    grant
        .map_err(fail)?
        .save(&source(&app, &user)?)
        .await
        .map_err(fail)?;
    lock(&app.needs_consent).remove(&user);
    Ok(format!("{user} is connected: GET /users/{user}/token\n"))
}

async fn token(State(app): State<App>, Path(user): Path<String>) -> Result<Json<Value>, Problem> {
    let source = source(&app, &user)?;
    let token = source.access_token().await.map_err(|e| failure(&user, e))?;
    let expires_at = source.status().access_token_expires_at;
    let expires_at = expires_at.and_then(|at| at.format(&Rfc3339).ok());
    Ok(Json(
        json!({ "user": user, "access_token": token.secret(), "expires_at": expires_at }),
    ))
}

async fn revoke(State(app): State<App>, Path(user): Path<String>) -> Result<StatusCode, Problem> {
    let source = source(&app, &user)?;
    source.revoke().await.map_err(|e| failure(&user, e))?;
    // A revoke sends no event: the grant is dead by our hand.
    lock(&app.needs_consent).insert(user);
    Ok(StatusCode::NO_CONTENT)
}

async fn health(State(app): State<App>) -> Json<Value> {
    let status = app.manager.status();
    Json(json!({
        "loaded": status.loaded,
        "engines_created": status.engines_created,
        "sweeps": status.sweeps,
        "swept": status.swept,
        "sweep_failures": status.sweep_failures,
        "needs_consent": lock(&app.needs_consent).len(),
    }))
}

/// The user's grant; an id the store cannot hold as a key is the caller's mistake.
fn source(app: &App, user: &str) -> Result<RefreshingTokenSource, Problem> {
    app.manager
        .source(user)
        .map_err(|e| problem(StatusCode::BAD_REQUEST, e.to_string()))
}

/// An error answer: a status, a message and, for a transient failure, when to retry.
struct Problem(StatusCode, String, Option<u64>);

fn problem(status: StatusCode, message: impl Into<String>) -> Problem {
    Problem(status, message.into(), None)
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if let Some(seconds) = self.2 {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// An error as an HTTP answer, by what the caller can do about it.
fn failure(user: &str, e: Error) -> Problem {
    let text = e.to_string();
    match e {
        Error::ReauthorizationRequired {
            reason: ReauthorizationReason::NoRefreshToken,
            ..
        } => {
            let text = format!("no grant for {user}: POST /users/{user}/connect first");
            problem(StatusCode::NOT_FOUND, text)
        }
        e if e.needs_reauthorization() => {
            let text = format!("{user} must consent again ({text}): POST /users/{user}/connect");
            problem(StatusCode::UNAUTHORIZED, text)
        }
        e if e.is_transient() => {
            let wait = e.retry_after().unwrap_or(Duration::from_secs(1));
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            Problem(StatusCode::SERVICE_UNAVAILABLE, text, Some(seconds.max(1)))
        }
        Error::Consent { .. } => problem(StatusCode::BAD_REQUEST, text),
        Error::Config(_) | Error::Storage(_) => problem(StatusCode::INTERNAL_SERVER_ERROR, text),
        // The provider refused the client or answered nonsense.
        _ => problem(StatusCode::BAD_GATEWAY, text),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
