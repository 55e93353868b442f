"""Secure aggregation against a researcher who sends crafted, correctly signed messages.

One real node serves on a loopback websocket and trusts the researcher "alice"; the attacker
signs with alice's key, so only the node's own checks stand between it and an update in
clear (its envelopes claim to come from "bob", a name the node ignores). The other members
of a round are played by the attacker with fedcore's own scheme code and identity keys of
its own (a "fabricated member"), or are genuine nodes whose keys the node's administrator
put in its peer list. Each refusal is audited under alice's trusted name and key, and the
node keeps answering (the attacker pings it on exit).
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from fedcore.data import ArrayDataset
from fedcore.plan import PlanBundle
from fedcore.secagg import JoyeLibert, NodeContext, PairwiseMasking, open_node_session
from fedcore.secagg import _bigint as B
from fedcore.secagg.context import EphemeralSigner
from fedcore.wire.identity import Identity, full_fingerprint
from fedcore.wire.messages import ErrorReply, SecaggReply, SecaggRequest, TrainReply, TrainRequest
from tests._support.attack import Attacker, serve
from tests._support.secagg import SMALL

pytest.importorskip("sklearn")

from tests._support.sklearn_plans import SleepWhenToldPlan  # noqa: E402

SITE = "site"


@pytest.fixture
def site(tmp_path):
    """The node under attack, trusting alice and bob, with one dataset; its attackers."""
    keys = {name: tmp_path / f"{name}.key" for name in ("alice", "bob")}
    for path in keys.values():
        Identity(path)
    url, node = serve(tmp_path / SITE, SITE, trusted=keys, approval_required=False)
    X = np.random.default_rng(0).normal(size=(40, 3))
    node.datasets.add_arrays("cohort", ["sec"], X, (X[:, 0] > 0).astype(np.int64))

    def attacker(name="alice"):
        return Attacker(url, {SITE: node.identity.public_bytes}, key=keys[name])

    node.attacker = attacker
    node.fingerprint = {n: full_fingerprint(Identity(p).public_bytes) for n, p in keys.items()}
    yield node
    node.stop()


def _plan():
    X = np.zeros((4, 3))
    info = {**ArrayDataset(X, np.array([0, 1, 0, 1])).metadata(),
            "categories": {"target": [0, 1]}}
    plan = SleepWhenToldPlan({}, {}, info)
    plan.build(seed=0)
    return plan, info


def _train(node, secagg):
    """An honest training request of a small sklearn plan, with ``secagg`` options."""
    plan, info = _plan()
    (entry,) = node.datasets.list()
    return TrainRequest(plan=PlanBundle.from_class(SleepWhenToldPlan).to_wire(),
                        params=plan.get_parameters(), dataset_id=entry["id"],
                        data_info=info, training_args={"epochs": 1}, secagg=secagg)


def _refusals(node, phase=None):
    """The node's ``secagg-refused`` records; those of a request alice signed name her."""
    found = [e for e in node.audit_log() if e["event"] == "secagg-refused"
             and (phase is None or e.get("phase") == phase)]
    alice = getattr(node, "fingerprint", {}).get("alice")
    for e in found:
        if alice and e.get("researcher_key") == alice:
            assert e["researcher"] == "alice", e  # the trusted name, not the claimed one
    return found


class Round:
    """A round the attacker coordinates: the real node, and members it plays itself.

    ``signers`` gives a played member the identity key it signs with (default: a key of the
    attacker's own, i.e. a fabricated member).
    """

    def __init__(self, attacker, scheme, members, *, signers=None, experiment="exp-1",
                 round=1):
        self.a, self.experiment, self.round = attacker, experiment, round
        self.research = scheme.researcher_session(round, members, reference=_reference())
        self.signers = signers or {}
        self.played = {}

    def ask(self, phase, msg, **envelope):
        fields = {"experiment": self.experiment, "round": self.round, "sender": "bob",
                  **envelope}
        return self.a.ask(SITE, SecaggRequest(phase=phase, payload=msg), **fields).body

    def setup(self):
        """The real node's setup reply (or refusal) then, if it took part, the played ones'."""
        requests = self.research.setup_requests()
        got = self.ask("setup", requests.pop(SITE))
        if not isinstance(got, SecaggReply):
            return got
        self.research.add_setup(SITE, got.payload)
        for node, msg in requests.items():
            context = NodeContext(floors=SMALL, experiment=self.experiment,
                                  signer=self.signers.get(node) or EphemeralSigner())
            self.played[node] = open_node_session(node, msg, context)
            self.research.add_setup(node, self.played[node].answer("setup", msg))
        return got

    def share(self, tamper=None):
        """The share phase; ``tamper(msg)`` edits the real node's share message first."""
        got = None
        for node, msg in self.research.share_requests().items():
            if node == SITE:
                got = self.ask("share_keys", tamper(msg) if tamper else msg)
                if isinstance(got, SecaggReply):
                    self.research.add_shares(node, got.payload)
            else:
                self.research.add_shares(node, self.played[node].answer("share_keys", msg))
        return got


def _reference():
    return _plan()[0].get_parameters()  # the global model the training requests carry


# --- sessions bound to what they protect ---------------------------------------------------


def test_a_failed_setup_leaves_no_session_and_a_training_request_naming_it_is_refused(site):
    site.set_policy(secagg_required=True)
    sid = secrets.token_hex(16)
    plain = {"scheme": "plain", "session": sid, "round": 1, "params": {},
             "nodes": [SITE, "n2", "n3"]}
    two = {"scheme": "masking", "session": sid, "round": 1, "params": {},
           "nodes": [SITE, "n2"]}
    with site.attacker() as a:
        for opening in (plain, two):  # a scheme without a setup; a round below the floor
            refused = a.ask(SITE, SecaggRequest(phase="setup", payload=opening)).body
            assert isinstance(refused, ErrorReply), refused
        # the update would have travelled in clear under the "plain" session left behind
        reply = a.ask(SITE, _train(site, {"scheme": "masking", "session": sid, "round": 1,
                                          "peers": [SITE, "n2", "n3"]}), sender="bob").body
    assert isinstance(reply, ErrorReply) and reply.kind == "protocol", reply
    assert "not released" in reply.message and "neither protected nor in clear" in reply.message
    events = [e["event"] for e in site.audit_log()]
    assert "trained" not in events and "decision" not in events  # refused before training
    (train,) = _refusals(site, "train")
    assert (train["researcher"], train["researcher_key"]) == ("alice", site.fingerprint["alice"])
    assert len(_refusals(site, "setup")) == 2


def test_a_session_serves_only_the_key_experiment_and_round_it_was_set_up_for(site):
    with site.attacker() as a:
        r = Round(a, PairwiseMasking(clip=4.0), [SITE, "n2", "n3"])
        assert isinstance(r.setup(), SecaggReply) and isinstance(r.share(), SecaggReply)
        options = {**r.research.train_options(SITE), "weighting": "uniform"}
        never = {**options, "session": secrets.token_hex(16)}
        replies = {"never set up": a.ask(SITE, _train(site, never)).body,
                   "other experiment": a.ask(SITE, _train(site, options),
                                             experiment="exp-2").body,
                   "other round": a.ask(SITE, _train(site, options), round=2).body,
                   "other scheme": a.ask(SITE, _train(site, {**options,
                                                             "scheme": "plain"})).body}
    with site.attacker("bob") as b:  # another trusted researcher, once alice has gone
        replies["other key"] = b.ask(SITE, _train(site, options)).body
    with site.attacker() as a:
        honest = a.ask(SITE, _train(site, options)).body
    for why, reply in replies.items():
        assert isinstance(reply, ErrorReply) and reply.kind == "protocol", (why, reply)
    assert "was set up for researcher key" in replies["other key"].message
    assert "experiment 'exp-1', round 1" in replies["other round"].message
    assert "is a 'masking' session" in replies["other scheme"].message
    # the one matching request: trained, and its update left masked, never in clear
    assert isinstance(honest, TrainReply) and not honest.params and honest.secagg["values"].size
    refused = _refusals(site, "train")
    assert len(refused) == 5
    assert refused[-1]["researcher_key"] == site.fingerprint["bob"]
    assert refused[-1]["researcher"] == "bob" and refused[0]["researcher"] == "alice"


# --- node floors ------------------------------------------------------------------------------


@pytest.mark.parametrize("members", [[SITE], [SITE, "n2"]])
def test_one_and_two_node_secure_rounds_are_refused_by_default(site, members):
    with site.attacker() as a:
        r = Round(a, PairwiseMasking(clip=4.0), members)
        reply = r.setup()
    assert isinstance(reply, ErrorReply), reply
    assert "at least 3 nodes" in reply.message and "secagg_min_members" in reply.message
    (refused,) = _refusals(site, "setup")
    assert "secagg_min_members" in refused["reason"]
    assert refused["researcher_key"] == site.fingerprint["alice"]


def test_a_threshold_at_or_below_half_the_members_is_refused(site):
    members = [SITE, "n2", "n3", "n4"]
    opening = {"scheme": "masking", "session": secrets.token_hex(16), "round": 1,
               "params": {"threshold": 2, "clip": 4.0}, "nodes": members}
    with site.attacker() as a:
        reply = a.ask(SITE, SecaggRequest(phase="setup", payload=opening)).body
        # an honest threshold of 3, then a share message claiming t=2
        r = Round(a, PairwiseMasking(clip=4.0), members)
        r.setup()
        claimed = r.share(tamper=lambda msg: {**msg, "threshold": 2})
    assert isinstance(reply, ErrorReply) and "strict majority" in reply.message, reply
    assert "threshold=2" in reply.message
    assert isinstance(claimed, ErrorReply) and "Expected threshold t=3" in claimed.message
    assert [e["phase"] for e in _refusals(site)] == ["setup", "share_keys"]


# --- signed round keys and the peer list -------------------------------------------------------


def test_a_round_padded_with_members_the_node_does_not_know_is_refused_with_a_peer_list(site):
    n2, n3 = EphemeralSigner(), EphemeralSigner()  # genuine nodes, known to the site
    site.add_peer("n2", n2.public_bytes.hex())
    site.add_peer("n3", n3.public_bytes.hex())
    with site.attacker() as a:
        stranger = Round(a, PairwiseMasking(clip=4.0), [SITE, "n2", "ghost"],
                         signers={"n2": n2}).setup()
        # "n3" is in the peer list, but the attacker signs its keys with a key of its own
        posing = Round(a, PairwiseMasking(clip=4.0), [SITE, "n2", "n3"], signers={"n2": n2})
        assert isinstance(posing.setup(), SecaggReply)
        forged = posing.share()
        honest = Round(a, PairwiseMasking(clip=4.0), [SITE, "n2", "n3"],
                       signers={"n2": n2, "n3": n3})
        honest.setup()
        shared = honest.share()
    assert isinstance(stranger, ErrorReply) and "['ghost'] are not in this node's peer list"\
        in stranger.message and "fedcore-node peer add" in stranger.message
    assert isinstance(forged, ErrorReply), forged
    assert "node 'n3' does not verify against its key in this node's peer list" in \
        forged.message
    assert isinstance(shared, SecaggReply)  # the genuine peers' round goes on
    assert [e["phase"] for e in _refusals(site)] == ["setup", "share_keys"]
    assert [e["event"] for e in site.audit_log()].count("peer-added") == 2


def test_round_keys_swapped_or_unsigned_in_transit_are_refused_without_a_peer_list(site):
    def swap(msg):  # n2's keys replaced by n3's, n2's signature kept
        keys = dict(msg["keys"])
        keys["n2"] = {**keys["n3"], "identity": keys["n2"]["identity"],
                      "sig": keys["n2"]["sig"]}
        return {**msg, "keys": keys}

    def unsign(msg):
        keys = {n: {k: v for k, v in e.items() if k != "sig"} for n, e in msg["keys"].items()}
        return {**msg, "keys": keys}

    replies = {}
    with site.attacker() as a:
        for name, tamper in (("swapped", swap), ("unsigned", unsign)):
            r = Round(a, PairwiseMasking(clip=4.0), [SITE, "n2", "n3"])
            r.setup()
            replies[name] = r.share(tamper)
    assert "does not verify against the identity key relayed" in replies["swapped"].message
    assert "carry no signature" in replies["unsigned"].message
    assert len(_refusals(site, "share_keys")) == 2


# --- Joye-Libert parameters -------------------------------------------------------------------


def test_a_joye_libert_key_of_512_bits_is_refused_by_default(site):
    with site.attacker() as a:
        reply = Round(a, JoyeLibert(key_size=512, clip=4.0), [SITE, "n2", "n3"]).setup()
    assert isinstance(reply, ErrorReply), reply
    assert "at least 2048 bits" in reply.message and "secagg_min_key_bits" in reply.message
    assert len(_refusals(site, "setup")) == 1


def test_a_joye_libert_modulus_the_researcher_chose_is_refused(site):
    site.set_policy(secagg_min_key_bits=512)  # small keys: a test's speed
    own = JoyeLibert(key_size=512, modulus=B.biprime(512), clip=4.0)  # it knows p and q
    with site.attacker() as a:
        chosen = Round(a, own, [SITE, "n2", "n3"]).setup()
        # the node deals a modulus and signs it; the attacker relays its own instead
        dealt = Round(a, JoyeLibert(key_size=512, clip=4.0), [SITE, "x2", "x3"])
        assert isinstance(dealt.setup(), SecaggReply) and dealt.research.dealer == SITE
        swapped = dealt.share(tamper=lambda msg: {**msg, "modulus": own.modulus_.to_bytes(
            64, "little")})
        # a fabricated member "deals" the attacker's modulus: accepted only for want of a
        # peer list (docs/secure-aggregation.md); with one, the dealer is a stranger
        site.add_peer("n2", EphemeralSigner().public_bytes.hex())
        site.add_peer("n3", EphemeralSigner().public_bytes.hex())
        fake_dealer = Round(a, JoyeLibert(key_size=512, clip=4.0), ["a-dealer", SITE, "n2"])
        stranger = fake_dealer.setup()
    assert isinstance(chosen, ErrorReply) and "no node vouches for it" in chosen.message
    assert "secagg_jl_moduli" in chosen.message
    assert isinstance(swapped, ErrorReply) and "Joye-Libert modulus of node 'site' does " \
        "not verify" in swapped.message
    assert isinstance(stranger, ErrorReply)
    assert "['a-dealer'] are not in this node's peer list" in stranger.message
    assert len(_refusals(site)) == 3


# --- the honest path with peer lists -----------------------------------------------------------


def test_an_honest_experiment_between_nodes_that_list_each_other_as_peers_runs_unchanged():
    from fedcore import Experiment, RoundError, simulate

    rng = np.random.default_rng(1)
    X = rng.normal(size=(90, 3))
    y = (X[:, 0] > 0).astype(np.int64)
    with simulate.from_arrays(X, y, n_nodes=3, tags=["p"]) as fed:
        for node in fed.nodes:
            for other in fed.nodes:
                if other is not node:
                    node.add_peer(other.node_id, other.identity.public_key)
        exp = Experiment(SleepWhenToldPlan, tags=["p"], federation=fed.url, secagg="masking",
                         progress=False)
        rows = exp.run_once()
        assert rows["status"].tolist() == ["ok"] * 3 and set(rows["secagg"]) == {"masking"}
        stranger = fed.add_node("node-04")  # joins, but no node lists it
        stranger.datasets.add_arrays("part-4", ["p"], X, y)
        exp.search()
        with pytest.raises(RoundError, match="at least t=3.* Why: node-01: ") as err:
            exp.run_once()
        reasons = [str(err.value.failures.get(f"node-0{i}")) for i in (1, 2, 3)]
        assert all("['node-04'] are not in this node's peer list" in r for r in reasons), \
            err.value.failures
        exp.close()
        assert not _refusals(stranger)
        assert all(len(_refusals(n, "setup")) == 1 for n in fed.nodes[:3])
