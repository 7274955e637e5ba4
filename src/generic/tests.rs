use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::auth::hash_token_sha256;
use crate::codec::Will;
use crate::policy::load::parse_policy;

fn policy() -> String {
    format!(
        r##"
tenants:
  lab:
    anonymous: true
    users:
      alice: {{ token: "{a}", client_ids: ["alice-*"] }}
      ops1: {{ token: "{a}", groups: [ops] }}
    rules:
      - {{ allow: [publish, subscribe], topic: "devices/%c/#" }}
      - {{ allow: [subscribe], topic: "fleet/+/status", groups: [ops] }}
      - {{ deny: [receive], topic: "fleet/secret/#" }}
      - {{ allow: [subscribe], topic: "fleet/#", users: [alice] }}
      - {{ deny: [subscribe], topic: "test/nosubscribe" }}
      - {{ allow: [publish, subscribe], topic: "open/#" }}
    events: {{ topic: "$events/%c" }}
  shop:
    mount: "customers/shop/"
    on_violation: disconnect
    retained: deny
    users:
      alice: {{ token: "{b}" }}
    rules:
      - {{ allow: [publish, subscribe], topic: "#" }}
"##,
        a = hash_token_sha256(b"alice-pw"),
        b = hash_token_sha256(b"shop-pw"),
    )
}

fn profile(text: &str) -> (Generic, Arc<PolicyStore>) {
    let store = Arc::new(PolicyStore::new(
        parse_policy(text, Path::new("lab.yaml")).unwrap(),
    ));
    (Generic::new(store.clone(), Verifier::new(1, 4)), store)
}

fn info(tenant: Option<&str>) -> ConnectionInfo {
    ConnectionInfo::loopback_for_tests(tenant)
}

fn connect<'a>(
    client_id: &'a str,
    user: Option<&'a str>,
    password: Option<&'a [u8]>,
) -> Connect<'a> {
    Connect {
        version: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 30,
        properties: Vec::new(),
        client_id,
        will: None,
        username: user,
        password,
    }
}

async fn admit(
    profile: &Generic,
    connect: &Connect<'_>,
    info: &ConnectionInfo,
) -> Result<Client, Refusal> {
    let claim = profile.identify(connect, info)?;
    profile.authenticate(&claim, connect, info).await
}

/// Connects on a listener of no tenant, as `user` (`name@tenant`) with `password`.
async fn login(
    profile: &Generic,
    client_id: &str,
    user: &str,
    password: &[u8],
) -> Result<Client, Refusal> {
    admit(
        profile,
        &connect(client_id, Some(user), Some(password)),
        &info(None),
    )
    .await
}

#[test]
fn routes_by_listener_then_user_at_tenant() {
    let c = connect("x", Some("alice@lab"), None);
    assert_eq!(route(&c, &info(None)), Some(("lab", Some("alice"))));
    let c = connect("x", Some("me@home@lab"), None);
    assert_eq!(route(&c, &info(None)), Some(("lab", Some("me@home"))));
    // The listener's tenant wins; the user name is then taken whole.
    let c = connect("x", Some("alice"), None);
    assert_eq!(
        route(&c, &info(Some("shop"))),
        Some(("shop", Some("alice")))
    );
    assert_eq!(route(&c, &info(None)), None);
    let c = connect("x", Some("alice@shop"), None);
    assert_eq!(
        route(&c, &info(Some("shop"))),
        Some(("shop", Some("alice")))
    );
    assert_eq!(
        route(&c, &info(Some("lab"))),
        Some(("lab", Some("alice@shop")))
    );
    let c = connect("x", None, None);
    assert_eq!(route(&c, &info(None)), None);
}

#[tokio::test]
async fn authenticates_users_and_anonymous_clients() {
    let (profile, _) = profile(&policy());
    let ok = login(&profile, "alice-1", "alice@lab", b"alice-pw").await;
    assert_eq!(ok.unwrap().user, "alice");
    let wrong = login(&profile, "alice-1", "alice@lab", b"nope")
        .await
        .unwrap_err();
    assert!(wrong.bad_credentials);
    let no_password = admit(
        &profile,
        &connect("alice-1", Some("alice@lab"), None),
        &info(None),
    )
    .await
    .unwrap_err();
    assert!(no_password.bad_credentials);
    let unknown = login(&profile, "c", "mallory@lab", b"x").await.unwrap_err();
    assert!(unknown.bad_credentials);
    // Client-ID patterns.
    let other_id = login(&profile, "bob-1", "alice@lab", b"alice-pw")
        .await
        .unwrap_err();
    assert_eq!(other_id.cause, Cause::InvalidClientId);
    // Anonymous: admitted by lab, not by shop.
    let anonymous = admit(&profile, &connect("c", None, None), &info(Some("lab"))).await;
    assert_eq!(anonymous.unwrap().user, "");
    let refused = admit(&profile, &connect("c", None, None), &info(Some("shop")))
        .await
        .unwrap_err();
    assert_eq!(refused.cause, Cause::NotAuthorized);
    // Unknown tenant.
    let refused = login(&profile, "c", "a@nowhere", b"x").await.unwrap_err();
    assert_eq!(refused.detail.as_deref(), Some("unknown tenant"));
    // The same user name in another tenant is another user.
    assert!(login(&profile, "c", "alice@shop", b"alice-pw")
        .await
        .is_err());
    assert!(login(&profile, "c", "alice@shop", b"shop-pw").await.is_ok());
}

#[tokio::test]
async fn decides_by_the_first_matching_rule() {
    let (profile, _) = profile(&policy());
    let alice = login(&profile, "alice-1", "alice@lab", b"alice-pw")
        .await
        .unwrap();
    assert!(profile
        .check_publish(&alice, "devices/alice-1/temp")
        .is_ok());
    let refusal = profile
        .check_publish(&alice, "devices/alice-2/temp")
        .unwrap_err();
    assert!(refusal.keeps_connection);
    assert_eq!(
        refusal.detail.as_deref(),
        Some("no rule allows publish (default deny)")
    );
    let refusal = profile
        .check_subscribe(&alice, "test/nosubscribe")
        .unwrap_err();
    assert_eq!(
        refusal.detail.as_deref(),
        Some("rule lab.yaml:13 (deny [subscribe] test/nosubscribe)")
    );
    assert_eq!(
        crate::wiotp::codes::code(refusal.cause).reason_string(&refusal),
        format!(
            "{}: rule lab.yaml:13 (deny [subscribe] test/nosubscribe)",
            crate::wiotp::codes::code(Cause::NotAuthorized).text
        )
    );
    // The receive check: fleet/# may be subscribed, fleet/secret/... is not delivered.
    assert!(profile.check_subscribe(&alice, "fleet/#").is_ok());
    assert!(profile.may_deliver(&alice, "fleet/a/status", b"x"));
    assert!(!profile.may_deliver(&alice, "fleet/secret/key", b"x"));
    // Groups: ops may subscribe to statuses, alice's rule covers fleet/# anyway, anonymous not.
    let anonymous = admit(&profile, &connect("anon", None, None), &info(Some("lab")))
        .await
        .unwrap();
    assert!(profile
        .check_subscribe(&anonymous, "fleet/1/status")
        .is_err());
    let ops = login(&profile, "o", "ops1@lab", b"alice-pw").await.unwrap();
    assert!(profile.check_subscribe(&ops, "fleet/1/status").is_ok());
    assert!(profile.check_subscribe(&ops, "fleet/#").is_err());
    // A shared subscription is decided on its filter.
    assert!(profile.check_subscribe(&alice, "$share/g/open/#").is_ok());
    assert!(profile
        .check_subscribe(&alice, "$share/g/closed/#")
        .is_err());
    assert_eq!(
        profile
            .check_subscribe(&alice, "$share/g")
            .unwrap_err()
            .cause,
        Cause::InvalidTopic
    );
    // $ topics need rules of their own.
    assert!(profile.check_publish(&alice, "$SYS/x").is_err());
}

#[tokio::test]
async fn isolates_tenants_by_mount_and_client_id() {
    let (profile, _) = profile(&policy());
    let lab = admit(&profile, &connect("dev1", None, None), &info(Some("lab")))
        .await
        .unwrap();
    let shop = login(&profile, "dev1", "alice@shop", b"shop-pw")
        .await
        .unwrap();
    let lab_terms = profile.terms(&lab);
    let shop_terms = profile.terms(&shop);
    assert_eq!(lab_terms.broker_client_id.as_deref(), Some("lab/dev1"));
    assert_eq!(shop_terms.broker_client_id.as_deref(), Some("shop/dev1"));
    assert_eq!(lab_terms.topics.broker_prefix(), "lab/");
    assert_eq!(shop_terms.topics.broker_prefix(), "customers/shop/");
    let parts = shop_terms.topics.filter_to_broker("$share/g/a/#").unwrap();
    assert_eq!(parts.concat(), b"$share/g/customers/shop/a/#");
    assert!(lab_terms.assigned_client_id.is_none());
    // Shop refuses and closes; retained publishes are refused by the session.
    let refusal = profile.check_publish(&shop, "$SYS/broker").unwrap_err();
    assert!(!refusal.keeps_connection);
    assert!(profile.limits(&shop).refuse_retained);
    assert!(!profile.limits(&lab).refuse_retained && !profile.limits(&lab).strip_retained);
}

#[tokio::test]
async fn assigns_client_ids() {
    let (profile, _) = profile(&policy());
    let one = admit(&profile, &connect("", None, None), &info(Some("lab")))
        .await
        .unwrap();
    let two = admit(&profile, &connect("", None, None), &info(Some("lab")))
        .await
        .unwrap();
    let (one, two) = (profile.terms(&one), profile.terms(&two));
    let assigned = one.assigned_client_id.as_deref().unwrap();
    assert!(assigned.starts_with(ASSIGNED_PREFIX));
    assert_ne!(one.assigned_client_id, two.assigned_client_id);
    assert_eq!(
        one.broker_client_id.as_deref(),
        Some(&*format!("lab/{assigned}"))
    );
    // MQTT 3.1.1 needs a clean session for it; a user limited to patterns needs its own ID.
    let mut persistent = connect("", None, None);
    persistent.version = ProtocolVersion::V311;
    persistent.clean_start = false;
    let refused = admit(&profile, &persistent, &info(Some("lab")))
        .await
        .unwrap_err();
    assert_eq!(refused.cause, Cause::InvalidClientId);
    let refused = login(&profile, "", "alice@lab", b"alice-pw")
        .await
        .unwrap_err();
    assert_eq!(refused.cause, Cause::InvalidClientId);
}

#[tokio::test]
async fn checks_the_will() {
    let (profile, _) = profile(&policy());
    let mut c = connect("alice-1", Some("alice@lab"), Some(b"alice-pw"));
    c.will = Some(Will {
        properties: Vec::new(),
        topic: "devices/alice-2/gone",
        payload: b"x",
        qos: 0,
        retain: false,
    });
    let refused = admit(&profile, &c, &info(None)).await.unwrap_err();
    assert!(refused
        .detail
        .as_deref()
        .unwrap()
        .starts_with("will: no rule"));
    c.will.as_mut().unwrap().topic = "devices/alice-1/gone";
    assert!(admit(&profile, &c, &info(None)).await.is_ok());
    let mut c = connect("x", Some("alice@shop"), Some(b"shop-pw"));
    c.will = Some(Will {
        properties: Vec::new(),
        topic: "gone",
        payload: b"x",
        qos: 0,
        retain: true,
    });
    let refused = admit(&profile, &c, &info(None)).await.unwrap_err();
    assert_eq!(refused.v5_connack(), Some(0x9A));
}

#[tokio::test]
async fn reevaluates_after_a_policy_edit() {
    let (profile, store) = profile(&policy());
    let alice = login(&profile, "alice-1", "alice@lab", b"alice-pw")
        .await
        .unwrap();
    assert!(!profile.stale(&alice));
    assert!(profile.check_subscribe(&alice, "open/x").is_ok());
    let edited = policy().replace("topic: \"open/#\"", "topic: \"opened/#\"");
    store.replace(parse_policy(&edited, Path::new("lab.yaml")).unwrap());
    assert!(profile.stale(&alice));
    let alice = profile.reevaluate(&alice).unwrap();
    assert!(profile.check_subscribe(&alice, "open/x").is_err());
    assert!(profile.check_subscribe(&alice, "opened/x").is_ok());
    // A removed user is revoked.
    let edited = policy().replace("alice: {", "alicia: {");
    store.replace(parse_policy(&edited, Path::new("lab.yaml")).unwrap());
    assert_eq!(
        profile.reevaluate(&alice).unwrap_err().cause,
        Cause::Revoked
    );
}

#[tokio::test]
async fn publishes_lifecycle_events_and_settles_them() {
    let (profile, _) = profile(&policy());
    let c = connect("alice-1", Some("alice@lab"), Some(b"alice-pw"));
    let alice = admit(&profile, &c, &info(None)).await.unwrap();
    let connected = profile.connected(&alice, Counters::default());
    assert_eq!(connected.len(), 1);
    assert_eq!(connected[0].topic, "lab/$events/alice-1");
    let event: serde_json::Value = serde_json::from_slice(&connected[0].payload).unwrap();
    assert_eq!(event["Action"], "Connect");
    assert_eq!(event["User"], "alice");
    let closed = profile.disconnected(
        &alice,
        &Refusal::new(Cause::ClientClosed),
        Counters::default(),
        true,
    );
    let event: serde_json::Value = serde_json::from_slice(&closed[0].payload).unwrap();
    assert_eq!(event["Action"], "Disconnect");
    let entry = profile.settlement(&alice, Counters::default());
    let settled = profile.settle(&entry).unwrap();
    assert_eq!(settled.presence, "lab/alice-1");
    assert_eq!(settled.publications[0].topic, "lab/$events/alice-1");
    let event: serde_json::Value =
        serde_json::from_slice(&settled.publications[0].payload).unwrap();
    assert_eq!(
        (event["Action"].as_str(), event["CloseCode"].as_u64()),
        (Some("Disconnect"), Some(92))
    );
    assert!(
        event["Reason"]
            .as_str()
            .unwrap()
            .ends_with("settled after a proxy restart"),
        "{event}"
    );
    // The event's time is the settlement's, not the connect's that stored the entry.
    let mut old: serde_json::Value = serde_json::from_slice(&entry).unwrap();
    old["event"]["Time"] = "2000-01-01T00:00:00.000Z".into();
    let settled = profile.settle(&serde_json::to_vec(&old).unwrap()).unwrap();
    let event: serde_json::Value =
        serde_json::from_slice(&settled.publications[0].payload).unwrap();
    assert_ne!(event["Time"], "2000-01-01T00:00:00.000Z");
    // Settled by another instance: closed as that instance says (a takeover here), not as a
    // restart.
    let taken_over = profile
        .settle_as(&entry, &Refusal::new(Cause::TakenOver))
        .unwrap();
    let event: serde_json::Value =
        serde_json::from_slice(&taken_over.publications[0].payload).unwrap();
    assert_eq!(event["CloseCode"], 288);
    assert!(
        !event["Reason"].as_str().unwrap().contains("restart"),
        "{event}"
    );
    let stopped = Refusal::with_detail(Cause::ServerClosed, "its proxy instance stopped");
    let event: serde_json::Value = serde_json::from_slice(
        &profile.settle_as(&entry, &stopped).unwrap().publications[0].payload,
    )
    .unwrap();
    assert_eq!(event["CloseCode"], 92);
    assert!(
        event["Reason"]
            .as_str()
            .unwrap()
            .ends_with("its proxy instance stopped"),
        "{event}"
    );
    // Shop has no events.
    let shop = login(&profile, "x", "alice@shop", b"shop-pw")
        .await
        .unwrap();
    assert!(profile.connected(&shop, Counters::default()).is_empty());
    assert!(profile.settle(b"{\"org_prefix\":\"x\"}").is_none());
}

#[tokio::test]
async fn deciding_allocates_nothing() {
    let (profile, _) = profile(&policy());
    let alice = login(&profile, "alice-1", "alice@lab", b"alice-pw")
        .await
        .unwrap();
    let counted = allocation_counter::measure(|| {
        for _ in 0..100 {
            assert!(profile
                .check_publish(&alice, "devices/alice-1/temp")
                .is_ok());
            assert!(profile.may_deliver(&alice, "fleet/a/status", b"x"));
            assert!(!profile.may_deliver(&alice, "fleet/secret/x", b"x"));
        }
    });
    assert_eq!(counted.count_total, 0);
}
