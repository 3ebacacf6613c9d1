"""``vllm_patch.patching.patch``: every kind of attribute, wrapped once, original kept."""

from __future__ import annotations

from vllm_namm.vllm_patch.patching import is_patched, patch


class Target:
    def method(self, x: int) -> int:
        return x + 1

    @staticmethod
    def static(x: int) -> int:
        return x * 2

    @classmethod
    def klass(cls, x: int) -> str:
        return f"{cls.__name__}:{x}"

    @property
    def prop(self) -> int:
        return 7


class Child(Target):
    pass


def _patch_all(calls: list[str]) -> None:
    @patch(Target, "method")
    def method(original, self, x):
        calls.append("method")
        return original(self, x) * 10

    @patch(Target, "static")
    def static(original, x):
        calls.append("static")
        return original(x) + 100

    @patch(Target, "klass")
    def klass(original, cls, x):
        calls.append("klass")
        return original(cls, x) + "!"

    @patch(Target, "prop")
    def prop(original, self):
        calls.append("prop")
        return original(self) + 1


def test_patch_wraps_each_kind_once_and_keeps_the_original() -> None:
    assert not is_patched(Target, "method")
    calls: list[str] = []
    _patch_all(calls)
    _patch_all(calls)  # a second install (vLLM loads plugins several times) changes nothing
    t = Target()
    assert (t.method(1), Target.static(1), Child.klass(1), t.prop) == (20, 102, "Child:1!", 8)
    assert calls == ["method", "static", "klass", "prop"]
    assert all(is_patched(Target, n) for n in ("method", "static", "klass", "prop"))
    assert isinstance(Target.__dict__["static"], staticmethod) and isinstance(
        Target.__dict__["prop"], property
    )
    assert Target.method.__name__ == "method"  # functools.wraps: vLLM's introspection still sees the name


class Other:
    def method(self, x: int) -> int:
        return x + 1


def test_patch_an_instance_only() -> None:
    a, b = Other(), Other()
    for _ in range(2):

        @patch(a, "method")
        def method(original, x):
            return -original(x)

    assert (a.method(1), b.method(1)) == (-2, 2)
