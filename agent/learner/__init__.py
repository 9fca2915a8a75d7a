"""The learner: slow system (bundle encoder + head) fused with the fast episodic memory."""

from agent.learner.config import LearnerConfig, SleepConfig
from agent.learner.learner import Learner, LearnResult, Prediction

__all__ = ["LearnResult", "Learner", "LearnerConfig", "Prediction", "SleepConfig"]
