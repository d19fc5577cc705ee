from services.common.lifecycle import run
from services.gateway.service import Gateway
from services.gateway.settings import GatewaySettings

if __name__ == "__main__":
    run(Gateway(GatewaySettings()))
