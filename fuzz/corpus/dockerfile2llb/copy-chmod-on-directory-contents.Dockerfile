FROM scratch
COPY --chmod=0750 dir /d/
