FROM scratch
COPY logs/*.log /l/
