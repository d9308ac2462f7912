FROM scratch
COPY --exclude=*.log logs /e/
