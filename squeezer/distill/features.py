"""Feature matching (FitNets hints; Romero et al., 2015): intermediate outputs of the student
are pulled towards the teacher's.

For pairs ``(a_i, b_i)`` of student / teacher submodule names with captured outputs ``f_s^i`` and
``f_t^i`` (forward hooks; the first floating tensor of a tuple output):

    ``L_feat = sum_i mean((P_i(f_s^i) - f_t^i)^2)``

``P_i`` is the identity when the shapes agree; when they differ along exactly one axis (the
width: features of a linear layer, channels of a convolution) and ``projections`` is on, ``P_i`` is
a learned ``nn.Linear(width_s, width_t)`` applied along that axis. Teacher features are detached.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calibration import Batch, call_model, output_tensors
from ..errors import ConfigError, DataError


class _AxisLinear(nn.Module):
    """``nn.Linear`` applied along ``axis`` of a tensor."""

    def __init__(self, width_in: int, width_out: int, axis: int) -> None:
        super().__init__()
        self.axis = axis
        self.linear = nn.Linear(width_in, width_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.movedim(self.axis, -1)).movedim(-1, self.axis)


def _submodule(model: nn.Module, name: str, role: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"pairs: the {role} has no submodule {name!r}") from None


class FeatureMatcher(nn.Module):
    """Captures the paired intermediate outputs of ``student`` and ``teacher`` with forward hooks
    and computes :meth:`loss` (module docstring). Its own parameters are the projections.

    Projections are sized on a forward pass of both models: pass ``example`` (one input batch),
    or call :meth:`build`, before creating the optimizer. ``remove()`` detaches the hooks.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pairs: Mapping[str, str],
        projections: bool = True,
        example: Batch | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(pairs, Mapping) or not pairs:
            raise ConfigError("pairs must be a non-empty mapping {student_module: teacher_module}")
        self.pairs = dict(pairs)
        self.use_projections = projections
        self.projections = nn.ModuleDict()
        self.student_features: dict[str, Tensor] = {}
        self.teacher_features: dict[str, Tensor] = {}
        modules = [(_submodule(student, s_name, "student"), _submodule(teacher, t_name, "teacher"))
                   for s_name, t_name in self.pairs.items()]
        self._handles = []
        for (s_name, t_name), (s_module, t_module) in zip(self.pairs.items(), modules):
            self._handles.append(s_module.register_forward_hook(self._capture(self.student_features, s_name)))
            self._handles.append(t_module.register_forward_hook(self._capture(self.teacher_features, t_name)))
        if example is not None:
            try:
                self.build(student, teacher, example)
            except Exception:
                self.remove()
                raise

    @staticmethod
    def _capture(store: dict[str, Tensor], name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensors = output_tensors(output)
            if not tensors:
                raise DataError(f"feature module {name!r} returned no floating tensor to match")
            store[name] = tensors[0]
        return hook

    def build(self, student: nn.Module, teacher: nn.Module, example: Batch) -> None:
        """Run both models once on ``example`` (eval mode, no grad) and create the projections."""
        modes = [(m, m.training) for m in (student, teacher)]
        try:
            with torch.no_grad():
                for model in (student, teacher):
                    model.eval()
                    call_model(model, example)
        finally:
            for model, mode in modes:
                model.train(mode)
        for i, (s_name, t_name) in enumerate(self.pairs.items()):
            s, t = self._pair(s_name, t_name)
            axis = self._width_axis(s_name, t_name, s, t)
            if axis is not None and str(i) not in self.projections:
                self.projections[str(i)] = _AxisLinear(s.shape[axis], t.shape[axis], axis).to(s.device)

    def _pair(self, s_name: str, t_name: str) -> tuple[Tensor, Tensor]:
        if s_name not in self.student_features or t_name not in self.teacher_features:
            raise DataError(f"features {s_name!r} / {t_name!r} were not captured: run the student and the teacher first")
        return self.student_features[s_name], self.teacher_features[t_name]

    def _width_axis(self, s_name: str, t_name: str, s: Tensor, t: Tensor) -> int | None:
        if s.shape == t.shape:
            return None
        differ = [a for a in range(s.dim()) if s.dim() == t.dim() and s.shape[a] != t.shape[a]]
        if len(differ) != 1 or differ[0] == 0 or not self.use_projections:
            why = "enable projections" if len(differ) == 1 and differ[0] != 0 else "only one non-batch axis may differ"
            raise DataError(f"features {s_name!r} {tuple(s.shape)} and {t_name!r} {tuple(t.shape)} differ in shape ({why})")
        return differ[0]

    def loss(self) -> Tensor:
        """``L_feat`` over the most recently captured features."""
        total: Tensor | None = None
        for i, (s_name, t_name) in enumerate(self.pairs.items()):
            s, t = self._pair(s_name, t_name)
            axis = self._width_axis(s_name, t_name, s, t)
            if axis is not None:
                if str(i) not in self.projections:
                    raise DataError(f"features {s_name!r} and {t_name!r} need a projection: pass example=... to "
                                    "FeatureMatcher (or call build) before creating the optimizer")
                s = self.projections[str(i)](s)
            err = F.mse_loss(s.float(), t.detach().float())
            total = err if total is None else total + err
        return total

    def remove(self) -> None:
        """Detach the hooks from both models."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
