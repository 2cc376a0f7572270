//! Memory per loaded, idle grant of a `TokenManager`, beyond its token bytes, by a
//! counting allocator: `cargo bench --features manager --bench grant_memory`.
//! Prints one line per size; not a criterion bench (it measures bytes, not time).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use time::OffsetDateTime;
use tokenkeeper::{
    AccessToken, ClientCredentials, MemoryStore, ProviderProfile, RefreshToken, TokenManager,
    TokenSet,
};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for n in [1_000usize, 10_000] {
        let store = MemoryStore::new();
        let now = OffsetDateTime::now_utc();
        let mut token_bytes = 0;
        for i in 0..n {
            let mut set = TokenSet::new(AccessToken::new(format!("at-{i:032}")), now);
            set.refresh_token = Some(RefreshToken::new(format!("rt-{i:032}")));
            set.expires_at = Some(now + time::Duration::hours(10));
            token_bytes += 2 * 35;
            store.put(&format!("user-{i}"), set);
        }
        let manager = TokenManager::builder(
            ProviderProfile::generic(url::Url::parse("https://provider.invalid/token").unwrap()),
            ClientCredentials::new("id", "secret"),
        )
        .store(store)
        .capacity(u64::try_from(n).unwrap() * 2)
        .build()
        .unwrap();
        let before = LIVE.load(Ordering::Relaxed);
        runtime.block_on(async {
            for i in 0..n {
                let source = manager.source(&format!("user-{i}")).unwrap();
                source.access_token().await.unwrap();
            }
        });
        let _ = manager.status();
        let after = LIVE.load(Ordering::Relaxed);
        let per_grant = (after - before) / n as isize;
        let token_text = token_bytes / n;
        println!(
            "{n} loaded grants: {per_grant} bytes each beyond the store ({token_text} of them token text; {} beyond it)",
            per_grant - token_text as isize
        );
    }
}
