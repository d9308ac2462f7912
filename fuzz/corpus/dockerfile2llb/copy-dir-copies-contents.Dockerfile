FROM scratch
COPY dir /out/
