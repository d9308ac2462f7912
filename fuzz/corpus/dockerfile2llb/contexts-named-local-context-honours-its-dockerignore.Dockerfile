FROM scratch
COPY --from=extra / /e/
