from services.common.lifecycle import run
from services.fusion.service import Fusion
from services.fusion.settings import FusionSettings

if __name__ == "__main__":
    run(Fusion(FusionSettings()))
