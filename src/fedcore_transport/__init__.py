"""fedcore's transports: in-process (simulation); websocket and MQTT come as plug-ins too."""
