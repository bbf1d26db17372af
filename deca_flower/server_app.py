"""Flower ServerApp: the DECA coordinator. It never receives, holds or averages parameters.

It waits for the SuperNodes, learns their ranks by a handshake (which also
proves that all peers can run at once), builds the graph and mixing matrix,
hosts the rendezvous store of the gossip data plane, drives rounds -> blocks ->
phases, hands each node its neighbours and weights, collects metrics, runs the
evaluation at the end of every round, and writes the run's outputs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from deca_flower.blocks import block_order
from deca_flower.config import parse_fault_injection, to_yaml
from deca_flower.flower_config import config_from_run_config
from deca_flower.gossip import host_store
from deca_flower.membership import (
    Membership,
    MembershipError,
    full_membership,
    heal_donor,
    with_members,
    without,
)
from deca_flower.methods import MethodError, get_method
from deca_flower.optim import STEP_DIAGNOSTICS
from deca_flower.reporting import (
    INCOMPLETE,
    Progress,
    RunDir,
    format_eval,
    phase_time_split,
    plot_label_counts,
    plot_run,
    read_metrics,
    summary_markdown,
)
from deca_flower.resume import Checkpoint, check_resumable, load_checkpoint
from deca_flower.secure_channel import describe_data_plane, new_run_key
from deca_flower.task import build_topology
from deca_flower.task_kinds import make_task
from deca_flower.topology import describe

app = ServerApp()

# Replies carry metrics only; anything near a block's size would mean parameters leak.
MAX_REPLY_VALUES = 100_000
REPLY_POLL_S = 0.25  # Grid.send_and_receive polls every 3 s: too slow for short phases
FAILED_PHASE_GRACE_S = 15.0  # once every reply is a failure, how long to wait for the rest
FLOWER_OFFLINE_S = 70.0  # Flower marks a node offline 60 s after its last heartbeat

# Flower's error codes (flwr.common.constant.ErrorCode) and what a site's admin should do.
_ERROR_NAMES = {
    0: "UNKNOWN",
    1: "LOAD_CLIENT_APP_EXCEPTION",
    2: "CLIENT_APP_RAISED_EXCEPTION",
    3: "MESSAGE_UNAVAILABLE",
    4: "REPLY_MESSAGE_UNAVAILABLE",
    5: "NODE_UNAVAILABLE",
    6: "MOD_FAILED_PRECONDITION",
    7: "INVALID_FAB",
    8: "CLIENT_APP_CRASHED",
}
_ERROR_HINTS = {
    0: "See the site's SuperNode log.",
    1: "The site could not load the ClientApp: check that the app's dependencies are "
    "installed in the SuperNode's environment and that its bin directory is on PATH.",
    2: "The ClientApp raised: the site's SuperNode log has the traceback.",
    3: "The message expired (TTL = flower.phase_timeout_s) before the site pulled it: the "
    "site was offline or busy; raise flower.phase_timeout_s if phases are that long.",
    4: "The site's reply expired before the coordinator read it: raise flower.phase_timeout_s.",
    5: "The site went offline (no heartbeat for 60 s). Restart its SuperNode with the same "
    "--auth-supernode-private-key and state-dir once `flwr supernode list` shows it offline.",
    6: "A ClientApp mod refused the message: check the site's mods.",
    7: "The site rejected the app bundle (FAB): check the site's flwr version and disk space.",
    8: "The site's ClientApp process died (killed or out of memory) while its SuperNode lives: "
    "check memory on that host and the SuperNode log.",
}


class CoordinatorError(RuntimeError):
    pass


class CoordinatorStopped(CoordinatorError):
    """faults.stop_coordinator_at: the rehearsed loss of the coordinator (resume it)."""


class PhaseFailed(CoordinatorError):
    """Some sites failed a message. `lost`: node ids that failed on their own (offline,
    crashed, no reply, their own error); the others failed for want of them (gossip)."""

    def __init__(self, message: str, lines: list[str], lost: set[int]) -> None:
        super().__init__(message)
        self.lines, self.lost = lines, lost


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(context.run_config)
    Coordinator(grid, cfg, context.run_id).run()


class Coordinator:
    def __init__(self, grid: Grid, cfg: DictConfig, run_id: int) -> None:
        self.grid, self.cfg, self.run_id = grid, cfg, run_id
        self.n = cfg.num_clients
        self.graph, self.weights = build_topology(cfg)  # a bad graph fails before any node works
        self.store, self.store_port = host_store(
            "0.0.0.0", cfg.gossip.store_port, timeout_s=cfg.gossip.timeout_s
        )
        # Authenticates the gossip store; travels only in Flower messages (docs/security.md).
        self.store_key = new_run_key()
        self.rank_to_node: dict[int, int] = {}
        self.hostnames: dict[int, str] = {}
        # Where the schedule stands; a resumed run starts where its checkpoint says.
        self.resumed = self._load_resume_point()
        self.checkpoint = self.resumed or Checkpoint(state_id=str(run_id))
        self.phase = self.checkpoint.next_phase
        self.committed_phase = self.phase - 1  # the last phase every member finished
        self.membership = full_membership(self.graph, self.weights)
        # Lost ranks: the phase each was lost at, and which Flower has since listed as gone
        # (a restarted SuperNode is back only once it was gone: before that it is the dead
        # session, listed until Flower marks it offline).
        self.lost_at: dict[int, int] = {}
        self.gone: set[int] = set()
        self.presence_checked = 0.0
        self.max_reply_values = 0
        self.task = make_task(cfg, scoring=False)  # the coordinator only pools the scores

    # ------------------------------------------------------------------ the run

    def run(self) -> None:
        try:
            get_method(self.cfg).check_deployable()
        except MethodError as err:
            raise CoordinatorError(str(err)) from None
        self._check_simulation_concurrency()
        node_ids = self._wait_for_nodes()
        info = self._handshake(node_ids)
        num_blocks = info[0]["num_blocks"]
        self.steps = int(info[0]["steps_per_phase"])
        schedule = [(t, blocks) for t in range(self.cfg.train.rounds)
                    for blocks in self._phases(t, num_blocks)]  # fmt: skip
        run_dir = self._open_run_dir(info, len(schedule))
        self.run_dir = run_dir
        self._log_setup(info, num_blocks, record=self.resumed is None)
        progress = Progress(len(schedule), done=self.phase)
        self.progress = progress
        if self.cfg.eval.zero_shot and -1 not in self.checkpoint.evaluated:
            self._announce_eval(-1)
            self._evaluate(-1)
        global_step = self.checkpoint.global_step
        for index in range(self.phase, len(schedule)):
            t, blocks = schedule[index]
            self._evaluate_finished_rounds(t)
            self._readmit_returned_sites()
            self._stop_if_rehearsed(index)
            global_step = self._train_phase(t, blocks, global_step)
        self._evaluate_finished_rounds(self.cfg.train.rounds)
        self._finish_nodes()
        run_dir.log(
            {
                "type": "coordinator",
                "max_reply_values": self.max_reply_values,
                "array_records_received": 0,
            }
        )
        records = read_metrics(run_dir.metrics_path)
        run_dir.write_text("summary.md", summary_markdown(records, to_yaml(self.cfg)))
        plot_run(records, run_dir.path, self.task.label_names)
        out = run_dir.finish()
        progress.note(f"done: {out}/summary.md")

    def _evaluate_finished_rounds(self, current_round: int) -> None:
        """Evaluate every round before `current_round` that is due and not yet evaluated
        (in a fresh run: the round that just ended; in a resumed one, possibly its last)."""
        every, rounds = self.cfg.eval.every_rounds, self.cfg.train.rounds
        for t in range(current_round):
            due = (t + 1) % every == 0 or t == rounds - 1
            if due and t not in self.checkpoint.evaluated:
                self._announce_eval(t)
                self._evaluate(t)

    def _announce_eval(self, t: int) -> None:
        per_client = self.cfg.eval.max_examples_per_client
        self.progress.evaluating(t, self.n, per_client, self.cfg.eval.average_model)

    def _finish_nodes(self) -> None:
        """Nodes export their final model if asked, and drop simulation-only state."""
        request = self._common_request("finish")
        request.update(
            {
                "keep_state": self.cfg.flower.keep_state,
                "export_models": self.cfg.flower.export_models,
            }
        )
        replies = self._send_to_ranks(request, "query.finish")
        exported = [replies[r].get("exported", "") for r in self.members]
        if any(exported):
            self.run_dir.log({"type": "exported_models", "paths": exported})
            self.progress.note(f"final models saved by the nodes, e.g. {exported[0]}")

    def _phases(self, t: int, num_blocks: int) -> list[list[int]]:
        order = block_order(num_blocks, self.cfg.train.block_order, t, self.cfg.seed)
        return [order] if self.phase_length == "round" else [[k] for k in order]

    @property
    def phase_length(self) -> str:
        if self.cfg.flower.phase != "auto":
            return self.cfg.flower.phase
        return "block" if self.simulated else "round"

    @property
    def simulated(self) -> bool:
        return type(self.grid).__name__ == "InMemoryGrid"

    # ------------------------------------------------------------------ nodes

    def _check_simulation_concurrency(self) -> None:
        """Fail before any work if Flower's simulation engine cannot run all peers at once.

        flwr's simulation engine hands messages to the Ray actors from a
        `ThreadPoolExecutor()` with Python's default size, min(32, CPUs + 4): no
        federation setting lifts that, so more peers than that would wait forever.
        """
        if not self.simulated:  # deployment: every node is a process
            return
        limit = min(32, (os.cpu_count() or 1) + 4)
        if self.n > limit:
            raise CoordinatorError(
                f"num_clients={self.n}, but Flower's simulation engine runs at most {limit} "
                f"messages at once on this {os.cpu_count()}-CPU host (CPUs + 4), and all DECA "
                f"peers must run at the same time. Use --run-config 'num-clients={limit}' "
                f'with --federation-config "num-supernodes={limit} client-resources-num-cpus=1 '
                f'init-args-num-cpus={limit}", a host with at least {self.n - 4} CPUs, the '
                "in-process engine (deca-flower engine), or a deployment (docs/deployment.md)."
            )

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.cfg.flower.min_nodes_wait_s
        while True:
            node_ids = sorted(self.grid.get_node_ids())
            if len(node_ids) >= self.n:
                break
            if time.monotonic() > deadline:
                raise CoordinatorError(
                    f"num_clients={self.n} but only {len(node_ids)} SuperNodes connected after "
                    f"{self.cfg.flower.min_nodes_wait_s:.0f} s. {_federation_hint(self.n)}"
                )
            time.sleep(1.0)
        if len(node_ids) > self.n:
            raise CoordinatorError(
                f"{len(node_ids)} SuperNodes connected but num_clients={self.n}: set "
                f"num-clients={len(node_ids)} (--run-config) or start {self.n} SuperNodes"
            )
        return node_ids

    def _handshake(self, node_ids: list[int]) -> dict[int, dict[str, Any]]:
        """Learn every node's rank and check the sites agree before any of them trains."""
        request = self._common_request("handshake")
        request["barrier_timeout_s"] = self.cfg.flower.barrier_timeout_s
        replies = self._send({nid: request for nid in node_ids}, "query.handshake")
        self.hostnames = {nid: str(r.get("hostname", "")) for nid, r in replies.items()}
        by_rank: dict[int, dict[str, Any]] = {}
        for node_id, reply in sorted(replies.items()):
            rank = int(reply["rank"])
            if not 0 <= rank < self.n:
                raise CoordinatorError(
                    f"{self._site(node_id, rank)} reports partition-id={rank}; every site needs a "
                    f"distinct partition-id in 0..{self.n - 1} (its --node-config)"
                )
            if rank in by_rank:
                raise CoordinatorError(
                    f"two sites have partition-id={rank}: SuperNode {self.rank_to_node[rank]}"
                    f" on {self.hostnames[self.rank_to_node[rank]]} and SuperNode {node_id} on "
                    f"{self.hostnames[node_id]}; give every site a distinct partition-id in "
                    f"0..{self.n - 1} (its --node-config)"
                )
            partitions = int(reply.get("num_partitions", -1))
            if partitions not in (-1, self.n):
                raise CoordinatorError(
                    f"{self._site(node_id, rank)} has num-partitions={partitions} but the run has "
                    f"num-clients={self.n}; set num-partitions={self.n} in its --node-config "
                    f"or num-clients={partitions} in the run config"
                )
            self.rank_to_node[rank] = node_id
            by_rank[rank] = reply
        self._check_sites_agree(by_rank)
        self.site_facts = by_rank[0]  # what a returning site must match
        return by_rank

    def _check_sites_agree(self, by_rank: dict[int, dict[str, Any]]) -> None:
        """Same config, base model, tokenizer and task everywhere, or a named error."""
        checks = {
            "config_hash": "resolved config (run config, presets)",
            "model_hash": "base model or tokenizer (model.name, its files on the site)",
            "data_hash": "task (data.name, labels, prompt: data config and data-path)",
            "num_blocks": "number of blocks (model layers, train.layers_per_block)",
        }
        for key, what in checks.items():
            values = {r: by_rank[r].get(key) for r in by_rank}
            if len(set(values.values())) > 1:
                reference = by_rank[0].get(key)
                differ = [r for r, v in values.items() if v != reference]
                raise CoordinatorError(
                    f"sites disagree on the {what}: "
                    + ", ".join(
                        f"{self._site(self.rank_to_node[r])} has {values[r]}" for r in differ
                    )
                    + f" but rank 0 has {reference}. Every site must load the same {what}; "
                    "fix the differing sites before training"
                )

    # ------------------------------------------------------------------ phases

    def _train_phase(self, t: int, blocks: list[int], global_step: int) -> int:
        """One phase on the current members; rerun (after a membership change) if it fails.

        A phase counts only once every member finished it: until then every node keeps its
        last committed phase (nodes that did commit it roll back when it is rerun).
        """
        attempt = 0
        while True:
            epoch = self.membership.epoch
            request = self._common_request(f"phase{self.phase}/epoch{epoch}/attempt{attempt}")
            request.update({"round": t, "blocks": blocks, "steps": self.steps, "attempt": attempt})
            started = time.perf_counter()
            try:
                replies = self._send_to_ranks(request, "train.deca")
                break
            except PhaseFailed as failure:
                attempt += 1
                self._recover(failure, attempt)
        self.phase_wall_s = time.perf_counter() - started
        members = self.members
        losses = {r: replies[r]["loss"] for r in members}
        steps = len(losses[members[0]])
        for s in range(steps):
            k = blocks[s // self.steps]
            self.run_dir.log(
                {
                    "type": "step",
                    "round": t,
                    "block": k,
                    "step": s % self.steps,
                    "global_step": global_step + s,
                    "loss": [losses[r][s] if r in losses else None for r in range(self.n)],
                }
            )
        record = self._phase_record(t, blocks, replies)
        self.run_dir.log(record)
        # Committed (and checkpointed) before the console says so: whoever acts on that line
        # (a user, the lab's fault injection) finds the checkpoint saying so too.
        self.committed_phase = self.phase
        self.phase += 1
        self._save_checkpoint(blocks, global_step + steps)
        split = record["time_split"]
        self.progress.phase_done(
            f"round {t + 1} block(s) {blocks[0]}"
            + (f"-{blocks[-1]}" if len(blocks) > 1 else "")
            + f" ({split['wall_s']:.1f} s, {100 * split['non_training_share']:.0f}% not training)",
            sum(loss[-1] for loss in losses.values()) / len(losses),
        )
        return global_step + steps

    @property
    def members(self) -> list[int]:
        return list(self.membership.members)

    # ------------------------------------------------------------------ faults

    def _recover(self, failure: PhaseFailed, attempt: int) -> None:
        """After a failed phase: record it, change the membership if sites were lost (or
        wait for them), or stop with an error that names the sites and the settings."""
        faults = self.cfg.faults
        lost = sorted(self.rank_of[nid] for nid in failure.lost)
        self.run_dir.log(
            {
                "type": "fault",
                "phase": self.phase,
                "attempt": attempt,
                "epoch": self.membership.epoch,
                "lost_ranks": lost,
                "failures": failure.lines,
                "time": time.time(),
            }
        )
        self.progress.note(
            f"phase {self.phase + 1} failed (attempt {attempt}); lost rank(s) {lost or 'none'}"
        )
        if faults.on_peer_loss == "stop" or attempt > faults.max_retries:
            why = (
                "faults.on_peer_loss=stop"
                if faults.on_peer_loss == "stop"
                else f"faults.max_retries={faults.max_retries} reruns of this phase failed"
            )
            raise CoordinatorError(f"{failure} ({why})")
        if not lost:
            return  # only peers' errors (e.g. a transient link failure): rerun as it is
        if faults.on_peer_loss == "continue":
            for rank in lost:
                self.lost_at.setdefault(rank, self.phase)
            try:
                self._set_membership(
                    without(
                        self.membership,
                        set(lost),
                        self.graph,
                        self.cfg.topology.mixing,
                        faults.min_peers,
                    )
                )
                return
            except MembershipError as err:
                self.progress.note(
                    f"cannot go on without rank(s) {lost}: {err}; waiting up to "
                    f"{faults.rejoin_wait_s:.0f} s (faults.rejoin_wait_s)"
                )
                self.run_dir.log(
                    {"type": "waiting", "phase": self.phase, "lost_ranks": lost, "reason": str(err)}
                )
                self._wait_for_rejoin(lost, str(err))
                return
        self._wait_for_rejoin(lost, "faults.on_peer_loss=wait")

    def _wait_for_rejoin(self, lost: list[int], reason: str) -> None:
        """Wait (bounded) until the lost sites' SuperNodes are back, then rerun the phase."""
        wanted = {self.rank_to_node[r] for r in lost}
        lost_at = time.monotonic()
        deadline = lost_at + self.cfg.faults.rejoin_wait_s
        gone: set[int] = set()
        while True:
            listed = set(self.grid.get_node_ids())
            gone |= wanted - listed
            # A dead SuperNode stays listed until Flower marks it offline (60 s without a
            # heartbeat): listed again counts as back only after it was gone, or after that.
            # Simulated nodes never go: a lost one is back only when rehearsed (faults.rejoin).
            settled = time.monotonic() - lost_at > FLOWER_OFFLINE_S and not self.simulated
            if set(lost) <= self._rehearsed_rejoins() or (
                wanted <= listed and (gone >= wanted or settled)
            ):
                break
            if time.monotonic() > deadline:
                sites = ", ".join(self._site(self.rank_to_node[r]) for r in lost)
                raise CoordinatorError(
                    f"lost {sites} and they did not come back within "
                    f"{self.cfg.faults.rejoin_wait_s:.0f} s (faults.rejoin_wait_s): {reason}. "
                    "Restart them with the same key and state-dir, or allow the run to go on "
                    "without them (faults.on_peer_loss=continue, faults.min_peers)"
                )
            time.sleep(1.0)
        self.run_dir.log({"type": "rejoined", "phase": self.phase, "ranks": lost})
        self.progress.note(f"rank(s) {lost} are back; rerunning phase {self.phase + 1}")

    # ------------------------------------------------------------------ rejoin and heal

    def _note_absent_sites(self) -> set[int]:
        """Flower's node list (at most once a second); lost ranks missing from it are gone."""
        if not self.lost_at or time.monotonic() - self.presence_checked < 1.0:
            return set()
        self.presence_checked = time.monotonic()
        listed = set(self.grid.get_node_ids())
        self.gone |= {r for r in self.lost_at if self.rank_to_node[r] not in listed}
        return listed

    def _rehearsed_rejoins(self) -> set[int]:
        """faults.rejoin: the ranks that come back as the current phase starts."""
        pairs = parse_fault_injection(self.cfg.faults.rejoin, "faults.rejoin")
        return {r for r, p in pairs if p == self.phase}

    def _readmit_returned_sites(self) -> None:
        """At a phase boundary (faults.on_peer_loss=continue): a lost site whose SuperNode
        came back (same key, so the same node id; same state dir) restores its committed
        blocks, takes the blocks it missed from a live neighbour, and trains again; once
        every site is back the original graph and W are used again."""
        if self.cfg.faults.on_peer_loss != "continue" or not self.lost_at:
            return
        self.presence_checked = 0.0
        listed = self._note_absent_sites()
        rehearsed = self._rehearsed_rejoins()
        back = [r for r in sorted(self.lost_at) if r in rehearsed
                or (r in self.gone and self.rank_to_node[r] in listed)]  # fmt: skip
        if not back:
            return
        request = self._common_request(f"rejoin{self.phase}")
        try:
            facts = self._send({self.rank_to_node[r]: request for r in back}, "query.rejoin")
        except PhaseFailed as failure:
            self.progress.note(f"rank(s) {back} are listed again but did not answer; trying "
                               f"again at the next phase:\n{failure}")  # fmt: skip
            return
        healed = [r for nid, reply in sorted(facts.items())
                  if self._heal_returned_site(r := self.rank_of[nid], reply)]  # fmt: skip
        if not healed:
            return
        for rank in healed:
            self.lost_at.pop(rank)
            self.gone.discard(rank)
        self.run_dir.log({"type": "rejoined", "phase": self.phase, "ranks": healed})
        self._set_membership(
            with_members(
                self.membership,
                {*self.members, *healed},
                self.graph,
                self.weights,
                self.cfg.topology.mixing,
            )
        )

    def _heal_returned_site(self, rank: int, facts: dict[str, Any]) -> bool:
        """Check what the returning site loaded, then heal it; False: it stays out."""
        reference = self.site_facts
        differ = [k for k in ("config_hash", "model_hash", "data_hash") if facts.get(k) !=
                  reference.get(k)]  # fmt: skip
        if differ:
            self.run_dir.log({"type": "rejoin_refused", "phase": self.phase, "rank": rank,
                              "differs": differ})  # fmt: skip
            self.progress.note(
                f"rank {rank} is back but its {differ} differ from the run's: "
                "it stays out (restart it with the run's config and model)"
            )
            return False
        # Its own commits from the phase it was lost in on are stale too (the others reran it).
        since = min(int(facts.get("last_phase", -1)) + 1, self.lost_at[rank])
        blocks = sorted({k for p, ks in self.checkpoint.phase_blocks.items() if int(p) >= since
                         for k in ks})  # fmt: skip
        donor = heal_donor(rank, self.membership, self.graph)
        try:
            replies = self._send(self._heal_requests(rank, donor, blocks), "train.heal")
        except PhaseFailed as failure:
            self.progress.note(f"healing rank {rank} failed; it stays out:\n{failure}")
            return False
        mine, theirs = replies[self.rank_to_node[rank]], replies[self.rank_to_node[donor]]
        record = {"type": "heal", "phase": self.phase, "rank": rank, "from": donor,
                  "blocks": blocks, "hashes": mine["hashes"], "donor_hashes": theirs["hashes"],
                  "bytes_received": mine["bytes_received"], "time": time.time()}  # fmt: skip
        self.run_dir.log(record)
        if mine["hashes"] != theirs["hashes"]:
            self.progress.note(f"rank {rank}'s healed blocks differ from rank {donor}'s: it "
                               "stays out (see the heal record)")  # fmt: skip
            return False
        self.progress.note(f"rank {rank} is back: healed block(s) {blocks} from rank {donor} "
                           f"(hashes {', '.join(mine['hashes']) or '-'})")  # fmt: skip
        return True

    def _heal_requests(self, rank: int, donor: int, blocks: list[int]) -> dict[int, dict]:
        request = self._common_request(f"heal{self.phase}/rank{rank}")
        request.update({"round": -1, "blocks": [], "steps": 0, "heal_blocks": blocks,
                        "committed_phase": self.committed_phase})  # fmt: skip
        return {
            self.rank_to_node[r]: {
                **request,
                "heal_role": role,
                "group_rank": g,
                "world_size": 2,
                "neighbours": [1 - g],
                "weights": [0.5],
                "self_weight": 0.5,
            }  # fmt: skip
            for role, r, g in (("donor", donor, 0), ("receiver", rank, 1))
        }

    def _set_membership(self, membership: Membership) -> None:
        self.membership = membership
        record = {"type": "membership", "phase": self.phase, **membership.record()}
        self.run_dir.log(record)
        self.progress.note(
            f"membership epoch {membership.epoch}: going on with ranks {list(membership.members)}"
            f" (lost {list(membership.lost)}), W rebuilt ({self.cfg.topology.mixing}) with "
            f"spectral gap {record['spectral_gap']:.3f}"
        )

    # ------------------------------------------------------------------ resume

    def _load_resume_point(self) -> Checkpoint | None:
        """`resume=<run dir>`: its checkpoint, once its config proved result-equivalent."""
        if not self.cfg.resume:
            return None
        run_dir = Path(self.cfg.resume).resolve()
        checkpoint = load_checkpoint(run_dir)
        if not run_dir.name.endswith(INCOMPLETE):
            raise CoordinatorError(
                f"resume={str(run_dir)!r}: that run finished (its directory is not "
                f"{INCOMPLETE}); there is nothing to resume"
            )
        check_resumable(OmegaConf.load(run_dir / "config.yaml"), self.cfg, run_dir)
        return checkpoint

    def _open_run_dir(self, info: dict[int, dict[str, Any]], num_phases: int) -> RunDir:
        if self.resumed is None:
            run_dir = RunDir(self.cfg.output_dir, self.cfg.run_name, self.cfg)
            run_dir.write_text("config.yaml", to_yaml(self.cfg))
            self.checkpoint.save(run_dir.path)
            return run_dir
        self._check_resumed_nodes(info)
        run_dir = RunDir.reopen(self.cfg.resume, self.cfg)
        record = {"type": "resume", "phase": self.phase, "run_id": self.run_id,
                  "state_id": self.checkpoint.state_id, "phases_left": num_phases - self.phase,
                  "time": time.time()}  # fmt: skip
        run_dir.log(record)
        Progress(0).note(
            f"resuming run {self.checkpoint.state_id} at phase {self.phase + 1} of {num_phases}"
            f" (every node restores its blocks committed up to phase {self.phase})"
        )
        self._restore_lost_sites(run_dir)
        return run_dir

    def _check_resumed_nodes(self, info: dict[int, dict[str, Any]]) -> None:
        """Every node must hold the state the checkpoint expects (or one phase more, which
        it committed before the coordinator stopped; it rolls that back). Sites lost before
        the stop are behind and are healed."""
        committed = self.committed_phase
        lost = {int(r) for r in self.checkpoint.lost_at}  # behind on purpose: healed first
        wrong = {r: int(reply.get("last_phase", -1)) for r, reply in info.items()
                 if int(reply.get("last_phase", -1)) not in (committed, committed + 1)
                 and r not in lost}  # fmt: skip
        if wrong:
            sites = ", ".join(f"{self._site(self.rank_to_node[r])} holds phase {p + 1}"
                              for r, p in sorted(wrong.items()))  # fmt: skip
            raise CoordinatorError(
                f"resume={self.cfg.resume!r} continues after phase {committed + 1}, but {sites}"
                f" (state run-{self.checkpoint.state_id}). Start those sites with the state-dir "
                "they used in the original run, or start the run afresh without `resume`"
            )

    def _restore_lost_sites(self, run_dir: RunDir) -> None:
        """Sites lost before the stop hold stale blocks: start without them, as the run had
        gone on, and heal them at the first phase boundary (they are present: handshake)."""
        self.lost_at = {int(r): p for r, p in self.checkpoint.lost_at.items()}
        if not self.lost_at:
            return
        self.gone = set(self.lost_at)
        self.membership = without(self.membership, set(self.lost_at), self.graph,
                                  self.cfg.topology.mixing, min_peers=2)  # fmt: skip
        run_dir.log({"type": "membership", "phase": self.phase, **self.membership.record()})
        Progress(0).note(f"rank(s) {sorted(self.lost_at)} were lost before the stop: they are"
                         " healed before they train again")  # fmt: skip

    def _save_checkpoint(self, blocks: list[int], global_step: int) -> None:
        self.checkpoint.phase_blocks[str(self.committed_phase)] = list(blocks)
        self.checkpoint.lost_at = {str(r): p for r, p in self.lost_at.items()}
        self.checkpoint.next_phase = self.phase
        self.checkpoint.global_step = global_step
        self.checkpoint.save(self.run_dir.path)

    def _stop_if_rehearsed(self, index: int) -> None:
        """faults.stop_coordinator_at: stop as that phase starts (not when resuming at it)."""
        if index != self.cfg.faults.stop_coordinator_at:
            return
        if self.resumed is not None and index == self.resumed.next_phase:
            return
        self.run_dir.log({"type": "stopped", "phase": index, "time": time.time()})
        raise CoordinatorStopped(
            f"the coordinator stops as phase {index + 1} starts (faults.stop_coordinator_at="
            f"{index}); continue the run with --run-config \"resume='{self.run_dir.path}'\""
        )

    def _phase_record(self, t: int, blocks: list[int], replies: dict[int, dict]) -> dict:
        keys = (
            "bytes_sent",
            "bytes_received",
            "forward_s",
            "backward_s",
            "optimizer_s",
            "communication_s",
            "peak_memory_bytes",
            "train_state_bytes",
            "commit_s",
            "load_s",
            "handler_s",
        )
        record = {
            "type": "phase",
            "round": t,
            "block": blocks[0],
            "blocks": blocks,
            "block_numel": replies[self.members[0]].get("block_numel"),
        }
        record.update(
            {
                key: [replies[r].get(key) if r in replies else None for r in range(self.n)]
                for key in keys
            }
        )
        for key in ("bytes_sent", "bytes_received"):  # a lost site sent nothing
            record[key] = [0 if v is None else v for v in record[key]]
        record["members"] = self.members
        record["epoch"] = self.membership.epoch
        record["time_split"] = phase_time_split(self.phase_wall_s, record)
        record["time"] = time.time()  # when the phase was committed (faults' timeline)
        # Step diagnostics (None where a node could not define one, as in the engine).
        record.update(
            {
                k: [replies[r].get(k) if r in replies else None for r in range(self.n)]
                for k in STEP_DIAGNOSTICS
            }
        )
        return record

    def _evaluate(self, t: int) -> None:
        self._evaluate_round(t)
        self.checkpoint.evaluated.append(t)
        self.checkpoint.save(self.run_dir.path)

    def _evaluate_round(self, t: int) -> None:
        request = self._common_request(f"eval{t + 1}")
        request.update({"round": t, "blocks": [], "steps": 0, "zero_shot": t == -1})
        replies = self._send_to_ranks(request, "evaluate.deca")
        record = self._eval_record(t, replies, "")
        if t >= 0 and self.cfg.eval.average_model:
            distance = sum(replies[r]["squared_distance"] for r in self.members) / len(self.members)
            record["consensus_distance"] = distance**0.5
        first = replies[self.members[0]]
        if any(key.startswith("validation_") for key in first):
            part = self._eval_record(t, replies, "validation_")
            record["validation"] = {k: part[k] for k in ("clients", "client_mean", "average")
                                    if k in part}  # fmt: skip
        if any(key.startswith("global_") for key in first):
            record["global_test"] = self._global_test(t, replies)
        self.run_dir.log(record)
        self.progress.note(format_eval(record))

    def _eval_record(self, t: int, replies: dict[int, dict], prefix: str) -> dict:
        """The engine's record from the nodes' scores of their own test slices (and of the
        parameter average on them)."""
        task = self.task
        clients = [
            {**_scores(replies[r], prefix, task.score_keys),
             **_scores(replies[r], prefix, task.truth_keys)}
            for r in self.members
        ]  # fmt: skip
        average = None
        if t >= 0 and self.cfg.eval.average_model:
            average = [_scores(replies[r], f"average_{prefix}", task.score_keys)
                       for r in self.members]  # fmt: skip
        return task.pool(t, clients, average, self.member_label_counts)

    def _global_test(self, t: int, replies: dict[int, dict]) -> dict[str, Any]:
        """Each node scored rows rank::n with the shared model (the average, or the base
        model at zero-shot): put them back in order, as the engine scores them."""
        task, members = self.task, self.members
        first = replies[members[0]]
        truth = _scores(first, "global_", task.truth_keys)
        shared = None
        if any(key.startswith("global_shard_") for key in first):
            # Shards follow the group ranks (members in rank order), as the nodes cut them.
            shards = [_scores(replies[r], "global_shard_", task.score_keys) for r in members]
            shared = task.join_shards(shards)
        if t == -1:
            clients, average = [shared] * len(members), None
        else:
            clients = [_scores(replies[r], "global_", task.score_keys) for r in members]
            average = shared
        return task.global_record(truth, clients, average, self.member_label_counts)

    # ------------------------------------------------------------------ messaging

    def _common_request(self, tag: str) -> dict[str, Any]:
        return {
            "store_host": self.cfg.gossip.advertise_host,
            "store_port": self.store_port,
            "world_size": self.n,
            "group_name": f"run{self.run_id}/{tag}",
            "phase": self.phase,
            "store_key": self.store_key,
            # The nodes' state stores are named after the run that created them (a resumed
            # run continues the original's).
            "state_id": self.checkpoint.state_id,
        }

    def _send_to_ranks(self, request: dict[str, Any], message_type: str) -> dict[int, dict]:
        """The request to every member, with its place in this epoch's gossip group."""
        m = self.membership
        per_node = {}
        for rank in m.members:
            row = m.neighbours(rank)
            per_node[self.rank_to_node[rank]] = {
                **request,
                "group_rank": m.group_rank(rank),
                "world_size": len(m.members),
                "neighbours": [m.group_rank(j) for j in row],
                "weights": [float(m.weights[rank, j]) for j in row],
                "self_weight": float(m.weights[rank, rank]),
                "members": list(m.members),  # a stateful mixing rule's (CHOCO's) epoch
                "committed_phase": self.committed_phase,
            }
        replies = self._send(per_node, message_type)
        return {self.rank_of[nid]: reply for nid, reply in replies.items()}

    @property
    def member_label_counts(self) -> list[list[int]]:
        return [self.label_counts[r] for r in self.members]

    @property
    def rank_of(self) -> dict[int, int]:
        return {nid: r for r, nid in self.rank_to_node.items()}

    def _send(self, per_node: dict[int, dict[str, Any]], message_type: str) -> dict[int, dict]:
        """One message per node; the replies, keyed by node, or an error naming every failure.

        Replies are matched to the message they answer (`reply_to_message_id`), never by
        their source id: an error made by the SuperLink on a node's behalf (a node that went
        offline) carries the SuperLink's id. Messages expire after flower.phase_timeout_s
        (their TTL), so a node that comes back later cannot pull a stale phase.
        """
        timeout = self.cfg.flower.phase_timeout_s
        messages = [
            Message(
                RecordDict({"request": ConfigRecord(payload)}),
                dst_node_id=nid,
                message_type=message_type,
                ttl=timeout,
            )
            for nid, payload in per_node.items()
        ]
        ids = list(self.grid.push_messages(messages))
        node_of = dict(zip(ids, per_node, strict=True))
        replies: dict[int, Message] = {}
        deadline = time.monotonic() + timeout
        given_up_at = None
        while len(replies) < len(ids) and time.monotonic() < deadline:
            pending = [mid for mid in ids if node_of[mid] not in replies]
            for msg in self.grid.pull_messages(pending):
                nid = node_of.get(msg.metadata.reply_to_message_id)
                if nid is not None:
                    replies[nid] = msg
            if replies and all(_is_failure(m) for m in replies.values()):
                # Everyone who answered failed: the silent ones are the cause (a dead site
                # answers only when Flower notices, 60 s later). Wait a little for stragglers.
                given_up_at = given_up_at or time.monotonic()
                if time.monotonic() - given_up_at > FAILED_PHASE_GRACE_S:
                    break
            if len(replies) < len(ids):
                self._note_absent_sites()
                time.sleep(REPLY_POLL_S)
        self._log_security_events(replies)
        failures = {
            nid: self._failure(nid, replies.get(nid), message_type, timeout) for nid in per_node
        }
        failures = {nid: f for nid, f in failures.items() if f}
        if failures:
            lost = {nid for nid in failures if not _failed_for_want_of_a_peer(replies.get(nid))}
            lines = list(failures.values())
            raise PhaseFailed(
                f"{len(failures)} of {len(per_node)} site(s) failed {message_type} (node states "
                "stay committed up to the last finished phase):\n" + "\n".join(lines),
                lines,
                lost,
            )
        return {nid: self._unpack(nid, msg) for nid, msg in replies.items()}

    def _log_security_events(self, replies: dict[int, Message]) -> None:
        """Data-plane rejections the nodes saw (forged store values, bad blocks): records."""
        for nid, msg in replies.items():
            if msg.has_error() or not hasattr(self, "run_dir"):
                continue
            for event in msg.content["reply"].get("security_events", []) or []:
                record = {"type": "security", **json.loads(event), "seen_by": self._site(nid)}
                self.run_dir.log(record)
                self.progress.note(
                    f"security: {record.get('what')} from "
                    f"{record.get('from')} rejected by {record.get('check')}"
                )

    def _site(self, node_id: int, rank: int | None = None) -> str:
        if rank is None:
            rank = next((r for r, n in self.rank_to_node.items() if n == node_id), None)
        host = self.hostnames.get(node_id)
        where = f" on {host}" if host else ""
        return f"rank {'?' if rank is None else rank} (SuperNode {node_id}{where})"

    def _failure(self, nid: int, msg: Message | None, message_type: str, timeout: float) -> str:
        """'' if the reply is good, else one line naming the site, what failed and what to do."""
        site = self._site(nid)
        if msg is None:
            return (
                f"- {site}: no reply to {message_type} within {timeout:.0f} s "
                "(flower.phase_timeout_s); check that its SuperNode is running and its log"
            )
        if msg.has_error():
            hint = _ERROR_HINTS.get(msg.error.code, "see the site's SuperNode log")
            return (
                f"- {site}: Flower error {msg.error.code} ({_ERROR_NAMES.get(msg.error.code, '?')})"
                f" for {message_type}: {msg.error.reason}. {hint}"
            )
        if msg.content.array_records:
            return f"- {site} sent arrays to the coordinator: parameters must never travel here"
        reply = dict(msg.content["reply"])
        values = sum(len(v) if isinstance(v, list) else 1 for v in reply.values())
        self.max_reply_values = max(self.max_reply_values, values)
        if values > MAX_REPLY_VALUES:
            return f"- {site} sent {values} values: too large for metrics"
        if "error" in reply:
            hint = ""
            if "DECA peers were running at the same time" in reply["error"]:
                hint = " " + _federation_hint(self.n)
            return (
                f"- {site} failed {message_type}: {reply['error']}.{hint}\n"
                f"  --- peer traceback ---\n{reply.get('traceback', '')}"
            )
        return ""

    @staticmethod
    def _unpack(node_id: int, msg: Message) -> dict[str, Any]:
        return dict(msg.content["reply"])

    # ------------------------------------------------------------------ outputs

    def _log_setup(
        self, info: dict[int, dict[str, Any]], num_blocks: int, record: bool = True
    ) -> None:
        """Console lines about the run; `record`: also its topology and data records (a
        resumed run has them already)."""
        topo = describe(self.graph, self.weights)
        counts = [info[r]["label_counts"] for r in range(self.n)]
        self.label_counts = counts  # majority-class baselines, as the engine computes them
        if record:
            self._log_setup_records(topo, counts, num_blocks)
        Progress(0).note(
            f"{self.n} peers on a {topo['name']} graph (spectral gap {topo['spectral_gap']:.3f}),"
            f" {num_blocks} blocks x {self.cfg.train.steps_per_block} steps x "
            f"{self.cfg.train.rounds} rounds; gossip store on port {self.store_port}; "
            f"writing {self.run_dir.path}"
        )
        Progress(0).note(describe_data_plane(self.cfg.gossip.encryption, self.cfg.gossip.backend))

    def _log_setup_records(self, topo: dict, counts: list[list[int]], num_blocks: int) -> None:
        self.run_dir.log({"type": "topology", **topo, "mixing_matrix": self.weights.tolist()})
        self.run_dir.log(
            {
                "type": "data",
                "run_id": self.run_id,
                "state_dir_hint": "simulation: <output_dir>/state/run-<run_id>/node-<rank>",
                "label_counts": counts,
                "train_sizes": [sum(c) for c in counts],
                "num_blocks": num_blocks,
                "rank_to_node": {str(r): n for r, n in self.rank_to_node.items()},
            }
        )
        if counts[0]:  # instruction tuning has no labels to plot
            plot_label_counts(counts, self.run_dir.path / "label_distribution.png")


def _is_failure(msg: Message) -> bool:
    return msg.has_error() or "error" in msg.content["reply"]


def _failed_for_want_of_a_peer(msg: Message | None) -> bool:
    """A node whose phase failed because a neighbour was missing or broke (a survivor)."""
    if msg is None or msg.has_error():
        return False
    return str(msg.content["reply"].get("error", "")).startswith("GossipError")


def _federation_hint(n: int) -> str:
    return (
        f"All {n} DECA peers must run at the same time. In simulation run with "
        f'--federation-config "num-supernodes={n} client-resources-num-cpus=1 '
        f'init-args-num-cpus={n}" (on GPUs add client-resources-num-gpus=<gpus/{n}>); '
        f"in deployment start {n} SuperNodes that can reach the coordinator's store "
        "(gossip.advertise_host)."
    )


def _scores(reply: dict[str, Any], prefix: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A node's `prefix`ed scores: lists as sent, dicts put back together."""
    return {
        key: list(reply[prefix + key]) if prefix + key in reply else _unflatten(reply, prefix + key)
        for key in keys
    }


def _unflatten(reply: dict[str, Any], key: str) -> dict[str, Any]:
    """{"metrics.rouge_l": x} -> {"rouge_l": x} (client_app flattens nested replies)."""
    prefix = f"{key}."
    return {k.removeprefix(prefix): v for k, v in reply.items() if k.startswith(prefix)}
