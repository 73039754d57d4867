"""The Ray executor's checks that need no cluster (and no Ray): the shared folder a plan must lie
in, steps that must fit on one node, the config key, what a missing Ray says, how a lost node reads."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from executor_plans import wan_plan
from musubi_pipe.errors import PipelineError
from musubi_pipe.executors.failures import classify
from musubi_pipe.executors.musubi_env import MusubiConfig, load_config
from musubi_pipe.executors.ray_runner import check_cluster_plan


def _problems(plan, config) -> list:
    with pytest.raises(PipelineError) as err:
        check_cluster_plan(plan, config)
    return err.value.problems


def test_a_ray_run_needs_a_shared_folder_in_the_configuration(tmp_path):
    problems = _problems(wan_plan(tmp_path / "p"), MusubiConfig(file=tmp_path / "config.toml"))
    assert problems[0].path == "shared_root" and "shared_root = " in problems[0].fix
    assert str(tmp_path / "config.toml") in str(problems[0])


def test_workdir_and_outputs_outside_the_shared_folder_are_refused_by_field(tmp_path):
    plan = wan_plan(tmp_path / "p")
    config = MusubiConfig(shared_root=tmp_path / "shared", file=tmp_path / "config.toml")
    problems = _problems(plan, config)
    where = {p.path for p in problems}
    assert {"workdir", "state file", "files", "steps.train.outputs.lora"} <= where
    assert all("other nodes of the cluster cannot see it" in p.message for p in problems)
    check_cluster_plan(plan, replace(config, shared_root=tmp_path))  # inside: no complaint


def test_a_step_on_several_machines_is_refused(tmp_path):
    plan = wan_plan(tmp_path / "p")
    train = plan.steps[2]
    plan.steps[2] = replace(train, launch_args=[*train.launch_args, "--num_machines", "2"])
    problems = _problems(plan, MusubiConfig(shared_root=tmp_path))
    assert problems[0].path == "steps.train" and "on 2 machines" in problems[0].message


def test_a_step_needing_more_gpus_than_any_node_has_is_refused(tmp_path):
    from musubi_pipe.executors.ray_runner import check_fits

    plan = wan_plan(tmp_path / "p")
    check_fits(plan, 1, "10.0.0.1:6379")
    train = plan.steps[2]
    plan.steps[2] = replace(train, launch_args=["--multi_gpu", "--num_processes", "4"])
    with pytest.raises(PipelineError) as err:
        check_fits(plan, 2, "10.0.0.1:6379")
    (problem,) = err.value.problems
    assert problem.path == "steps.train" and "needs 4 GPUs" in problem.message and "has 2" in problem.message


def test_shared_root_is_read_from_the_config_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('shared_root = "/mnt/shared/musubi"\n')
    assert load_config({"MUSUBI_PIPE_CONFIG": str(path)}).shared_root == Path("/mnt/shared/musubi")
    path.write_text('shared_root = "relative/folder"\n')
    with pytest.raises(PipelineError) as err:
        load_config({"MUSUBI_PIPE_CONFIG": str(path)})
    assert err.value.problems[0].path == "shared_root" and "absolute" in err.value.problems[0].message


def test_a_lost_node_is_a_transient_failure_with_its_cause():
    log = ("step 1/100\nmusubi-pipe: ray: step runs on node n1 (abc), GPUs [0], pid 7\n"
           "Traceback (most recent call last):\nKeyboardInterrupt\n"
           "musubi-pipe: ray: node n1 (abc) lost while the step ran (ActorDiedError: The actor died)\n")
    failure = classify(log, 255, "train")
    assert failure.category == "node_lost" and failure.transient
    assert failure.cause.startswith("node n1 (abc) lost while the step ran")
    # the placement line alone is not a failure cause
    assert classify(log.rsplit("musubi-pipe: ray: node", 1)[0], 1, "train").category != "node_lost"


def test_without_ray_the_executor_says_how_to_install_it(tmp_path, monkeypatch):
    from musubi_pipe.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setenv("MUSUBI_PIPE_CONFIG", str(tmp_path / "config.toml"))
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('name = "x"\nfamily = "wan"\ntask = "t2v-1.3B"\n')
    out = CliRunner().invoke(main, ["run", "--executor", "ray", "--address", "127.0.0.1:1", str(pipeline)])
    assert out.exit_code == 2 and "pip install 'musubi-pipe[ray]'" in out.output, out.output


def test_the_ray_executor_needs_an_address(tmp_path, monkeypatch):
    from musubi_pipe.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('name = "x"\n')
    out = CliRunner().invoke(main, ["run", "--executor", "ray", str(pipeline)])
    assert out.exit_code == 2 and "--address HOST:PORT" in out.output


def test_the_ray_executor_refuses_before_connecting_what_the_local_one_refuses(tmp_path):
    from musubi_double import make_fake_checkout

    from executor_plans import config_for
    from musubi_pipe.executors.local import LocalExecutor
    from musubi_pipe.executors.ray_runner import RayExecutor

    config = replace(config_for(make_fake_checkout(tmp_path / "musubi-tuner")), shared_root=tmp_path)
    plan = wan_plan(tmp_path / "p")
    plan.steps[0] = replace(plan.steps[0], env={"LD_PRELOAD": "/tmp/evil.so"})
    nowhere = "127.0.0.1:9"  # nothing listens: a refusal must come before any connection
    messages = []
    for ex in (LocalExecutor(config), RayExecutor(config, nowhere)):
        with pytest.raises(PipelineError) as err:
            ex.run(plan, [])
        messages.append([str(p) for p in err.value.problems])
    assert messages[0] == messages[1] and "LD_PRELOAD may not be set" in messages[0][0]
    with pytest.raises(PipelineError) as err:  # and what only a cluster needs
        RayExecutor(replace(config, shared_root=None), nowhere).run(wan_plan(tmp_path / "q"), [])
    assert err.value.problems[0].path == "shared_root"


def test_an_address_nothing_answers_at_is_refused_at_once(tmp_path):
    pytest.importorskip("ray")
    import time

    import ray

    from musubi_pipe.executors.ray_runner import RayRunner

    ray.shutdown()  # no connection left by another test: this one makes its own
    began = time.monotonic()
    with pytest.raises(PipelineError) as err:
        RayRunner("127.0.0.1:9")
    assert time.monotonic() - began < 15
    assert err.value.problems[0].path == "--address" and "nothing answers" in err.value.problems[0].message


def test_a_step_waiting_for_gpus_says_so_once_and_stops_cleanly(monkeypatch):
    import threading

    from musubi_pipe.executors import ray_runner

    class FakeRay:  # a cluster that never has room for the step
        killed = []

        def wait(self, refs, timeout):
            threading.Event().wait(timeout)
            return [], refs

        def available_resources(self):
            return {"GPU": 1.0}

        def kill(self, actor, no_restart=True):
            self.killed.append(actor)

    monkeypatch.setattr(ray_runner, "WAITING_NOTE_S", 0.1)
    monkeypatch.setattr(ray_runner, "POLL_S", 0.05)
    proc = ray_runner.RayProc(FakeRay(), "actor", "started-ref", gpus=2)
    said = []
    reader = threading.Thread(target=proc.stream, args=(lambda name, chunk: said.append(chunk.decode()),))
    reader.start()
    threading.Event().wait(0.6)
    assert proc.wait(0) is None
    assert proc.stop(1.0) == -15 and FakeRay.killed == ["actor"]  # not placed: the actor is dropped, nothing ran
    reader.join(5)
    assert not reader.is_alive()
    assert said == ["musubi-pipe: ray: waiting for a node with 2 free GPU(s) (the cluster has 1 free GPU(s) now, "
                    "all nodes together)\n"]


def test_a_kept_actor_found_dead_is_replaced_before_the_step_starts():
    from types import SimpleNamespace

    from musubi_pipe.executors import ray_runner

    class RayError(Exception):
        pass

    class RayTaskError(RayError):
        pass

    class FakeRay:  # the kept actor's node is gone; a new actor starts the step and it ends at once
        exceptions = SimpleNamespace(RayError=RayError, RayTaskError=RayTaskError, GetTimeoutError=TimeoutError)

        def wait(self, refs, timeout):
            return refs, []

        def get(self, ref, timeout=None):
            if ref == "dead-start":
                raise RayError("The actor died unexpectedly before finishing this task.")
            if ref == "new-start":
                return {"node": "n2", "host": "h2", "gpus": "0", "pid": 42}
            return [("stdout", b"done\n")], 0

        def kill(self, actor, no_restart=True):
            pass

    fresh = []
    proc = ray_runner.RayProc(FakeRay(), SimpleNamespace(), "dead-start", 1,
                              afresh=lambda: fresh.append(1) or (SimpleNamespace(read=SimpleNamespace(remote=lambda w: "read")),
                                                                 "new-start"))
    said = []
    proc.stream(lambda name, chunk: said.append(chunk.decode()))
    assert fresh == [1] and proc.wait(0) == 0 and proc.where["node"] == "n2"
    assert said == ["musubi-pipe: ray: step runs on node h2 (n2), GPUs [0], pid 42\n", "done\n"]


def test_init_writes_the_shared_root(tmp_path, monkeypatch):
    from musubi_double import make_fake_checkout

    from musubi_pipe.cli import main

    config = tmp_path / "config.toml"
    monkeypatch.setenv("MUSUBI_PIPE_CONFIG", str(config))
    checkout = make_fake_checkout(tmp_path / "musubi-tuner", venv=False)
    out = CliRunner().invoke(main, ["init", "--musubi-dir", str(checkout), "--shared-root", str(tmp_path / "shared")])
    assert out.exit_code == 0, out.output
    assert load_config({"MUSUBI_PIPE_CONFIG": str(config)}).shared_root == (tmp_path / "shared").resolve()
