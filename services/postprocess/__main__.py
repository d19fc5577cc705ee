from services.common.lifecycle import run
from services.postprocess.service import Postprocess
from services.postprocess.settings import PostprocessSettings

if __name__ == "__main__":
    run(Postprocess(PostprocessSettings()))
